"""``clp-ac``: CLP's pruning, tuned on the clean images, then activation clipping (``ac``) on the pruned model.

Not a published method: CLP (Zheng, Tang, Li & Liu, ECCV 2022, section 4) and activation clipping (after
Wang et al., arXiv 2308.04617) in sequence; bnp-ac's pairing for the exports BNP cannot read. bnp-ac needs the
BatchNormalization the exporter kept (BNP compares clean moments with its running statistics), and almost every
export folds it. CLP reads the folded weights themselves. Why the pair (docs/algorithms.md, "clp-ac"), written
before its rows were measured: both change few clean predictions, which is what the guard's 100 checking images
can certify at 500 images, and they reach different backdoors. CLP with u tuned on the clean images took Blended
to 2.0 % and preact-BadNets to 2.9 % at 0.4 points and left the others; AC took SIG to 12 % and the ResNet BadNets
patches to 12-17 % and left Blended and BPP above 99 % (docs/results-repair.md, 500 images). Those figures
suggested the pair, so the zoo models they came from are not a test of it.

The pipeline, as bnp-ac's: CLP's spectral scores, ``u`` tuned on the fit images within a third of the budget
(:mod:`onnxclp.passes.tune`, ``tune_share``; a ``--u`` given is kept), the pruning applied, then AC trained on the
pruned model (its weight walk and epochs measured against the *input* model's accuracy, so the guard's final
check covers both stages). The report lists the pruned channels and the added nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxclp.methods import register
from onnxclp.methods._staged import CLPFirst
from onnxclp.methods.ac import AC
from onnxclp.methods.clp import CLP, U

if TYPE_CHECKING:
    from onnxclp.pipeline import State


@register
class CLPAC(CLPFirst, AC):
    name = "clp-ac"
    order = 39
    description = "CLP pruning tuned on the clean images, then activation clipping (ac) on the pruned model."
    paper = f"{CLP.paper}; then {AC.paper}"
    # scan's next step named it until session 15 (then 35.3 % under the guard at 500 images); with the two stages
    # in one fixed sequence (CLP's u held to the bound on the fit images) it leaves 73.4 %, and fst-gate is named
    suggested = False
    params = (U, *AC.params)

    def decide(self, state: State) -> None:
        """CLP's decisions, applied to the model now (so that AC trains on the pruned model), then AC; the
        pipeline's ``prune`` pass re-applies the same zeros and ``rewrite`` adds the bounds."""
        pruned = self.prune_first(state, "AC")
        AC.decide(self, state)
        state.decisions = pruned
