"""``clp-npd``: CLP's pruning, tuned on the clean images, then the neural polarizer on the pruned model.

Not a published method: two published ones in sequence (CLP, Zheng et al., ECCV 2022, section 4; NPD, Zhu et al.,
NeurIPS 2023, section 4). Why the pair (docs/algorithms.md, "clp-npd"): the two remove backdoors in different
places. CLP prunes channels whose Lipschitz upper bound is an outlier of their layer: a trigger the network
encodes in a few strongly amplifying channels (on the zoo, Blended: 84.1 / 2.0 from 84.5 / 100) goes, a small
patch trigger spread over ordinary channels does not (BadNets: 83.8 / 71.6). NPD's polarizer is trained against
adversarial perturbations of the clean images and filters what they share with a patch trigger (BadNets:
82.1 / 4.9) but left 17.3 % on Blended. Run one after the other, each covers the other's miss; those four
figures are what suggested the pair, so the zoo models they came from do not count as a test of it.

The pipeline: CLP's spectral scores (``score``), ``u`` tuned on the fit images within a third of the budget
(:mod:`onnxclp.passes.tune`, ``tune_share``; the user's ``--u`` is kept as given), the pruning applied, then
NPD trained on the pruned model with the rest of the budget: its epochs are chosen on the validation images
against the *input* model's accuracy, so the guard's final check (the input against the result) covers both
stages. The report lists the pruned channels and the added node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxclp.methods import register
from onnxclp.methods._staged import CLPFirst
from onnxclp.methods.clp import CLP, U
from onnxclp.methods.npd import NPD

if TYPE_CHECKING:
    from onnxclp.pipeline import State


@register
class CLPNPD(CLPFirst, NPD):
    name = "clp-npd"
    order = 35
    description = "CLP pruning tuned on the clean images, then the neural polarizer (NPD) on the pruned model."
    paper = f"{CLP.paper}; then {NPD.paper}"
    # scan's next step named it until session 11 (its first four models, 500 clean images: 9.3 % ASR at 2.6
    # points); on the seven-model zoo under the guard it leaves 68.7 %, and clp-ac is named instead
    suggested = False
    params = (U, *NPD.params)

    def decide(self, state: State) -> None:
        """CLP's decisions, applied to the model now (so that NPD trains on the pruned model), then NPD's training;
        the pipeline's ``prune`` pass re-applies the same zeros (idempotent) and ``rewrite`` adds the polarizer."""
        self.prune_then_polarize(state)

    def prune_then_polarize(self, state: State) -> tuple[Any, Any]:
        """:meth:`decide`'s work; returns the trained module (polarizer as a tap) and NPD's outcome."""
        pruned = self.prune_first(state, "NPD")
        module, outcome = self.train_polarizer(state)
        state.decisions = pruned
        return module, outcome
