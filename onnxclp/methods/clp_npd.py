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

import numpy as np

from onnxclp.methods import register
from onnxclp.methods.base import Params
from onnxclp.methods.clp import CLP, U
from onnxclp.methods.npd import NPD
from onnxclp.select import select_clp

if TYPE_CHECKING:
    from onnxclp.pipeline import State
    from onnxclp.select import Selection


@register
class CLPNPD(NPD):
    name = "clp-npd"
    order = 35
    description = "CLP pruning tuned on the clean images, then the neural polarizer (NPD) on the pruned model."
    paper = f"{CLP.paper}; then {NPD.paper}"
    # scan's next step named it until session 11 (its first four models, 500 clean images: 9.3 % ASR at 2.6
    # points); on the seven-model zoo under the guard it leaves 68.7 %, and clp-ac is named instead
    suggested = False
    score = "spectral"
    include_fc = False
    per_layer = True
    tune_share = 1.0 / 3.0  # the pruning stage's share of --max-acc-drop; NPD measures the rest against the input
    params = (U, *NPD.params)

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        return select_clp(scores, params["u"])

    def decide_for_tuning(self, state: State) -> None:
        """The pruning stage alone (what ``u`` changes)."""
        from onnxclp.passes.decide import decide_by_scores

        decide_by_scores(state, self)

    def decide(self, state: State) -> None:
        """CLP's decisions, applied to the model now (so that NPD trains on the pruned model), then NPD's training;
        the pipeline's ``prune`` pass re-applies the same zeros (idempotent) and ``rewrite`` adds the polarizer."""
        self.prune_then_polarize(state)

    def prune_then_polarize(self, state: State) -> tuple[Any, Any]:
        """:meth:`decide`'s work; returns the trained module (polarizer as a tap) and NPD's outcome."""
        from onnxclp.edit import Editor
        from onnxclp.passes import streams
        from onnxclp.passes.decide import decide_by_scores
        from onnxclp.passes.prune import apply_decisions

        assert state.index is not None
        decide_by_scores(state, self)
        streams.run(state)
        apply_decisions(Editor(state.index, state.store), state.decisions)
        pruned = state.decisions
        n = sum(len(d.selection.prune) for d in pruned)
        state.notes.append(f"clp-npd: {n} channel(s) pruned at u={state.params['u']:g}, then NPD on the pruned model")
        module, outcome = self.train_polarizer(state)
        state.decisions = pruned
        return module, outcome
