"""``bnp-ac``: BNP's pruning, tuned on the clean images, then activation clipping (``ac``) on the pruned model.

Not a published method: BNP (Zheng, Tang, Li & Liu, NeurIPS 2022, section 4) and activation clipping (after Wang
et al., arXiv 2308.04617) in sequence. Why the pair (docs/algorithms.md, "bnp-ac"): both change few clean
predictions, which is what the guard's checking part can certify, and they reach different backdoors. BNP prunes
the channels whose clean pre-activation moments leave the BatchNorm running statistics the poisoned training set
produced; with each model its own 2,500 images it took Blended to 0.5 %, BPP to 10.9 % and SIG to 17.5 % and left
VGG-BadNets at 91 % and WaNet at 51 %. AC bounds the activations no clean input needs; at 500 images it took SIG
to 12 % and the BadNets patches to 12-17 % (forced) and left Blended and BPP above 99 %. Those figures suggested
the pair, so the zoo models they came from are not a test of it.

The pipeline, as clp-npd's: BNP's ``u`` tuned on the fit images within a third of the budget
(:mod:`onnxclp.passes.tune`, ``tune_share``; a ``--u`` given is kept), the pruning applied, then AC trained on the
pruned model (its weight walk and epochs measured against the *input* model's accuracy, so the guard's final
check covers both stages). Needs BatchNormalization kept in the graph, as BNP does. The report lists the pruned
channels and the added nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxclp.methods import register
from onnxclp.methods.ac import AC
from onnxclp.methods.bnp import BNP
from onnxclp.methods.clp import U

if TYPE_CHECKING:
    import numpy as np

    from onnxclp.methods.base import Params
    from onnxclp.pipeline import State
    from onnxclp.select import Selection


@register
class BNPAC(AC):
    name = "bnp-ac"
    order = 38
    description = "BNP pruning tuned on the clean images, then activation clipping (ac) on the pruned model."
    paper = f"{BNP.paper}; then {AC.paper}"
    tune_share = 1.0 / 3.0  # the pruning stage's share of --max-acc-drop; AC measures the rest against the input
    params = (U, *AC.params)

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        return BNP.select(self, scores, params)  # type: ignore[arg-type]

    def precheck(self, state: State) -> None:
        BNP.precheck(self, state)  # type: ignore[arg-type]

    def decide_for_tuning(self, state: State) -> None:
        """The pruning stage alone (what ``u`` changes)."""
        BNP.decide(self, state)  # type: ignore[arg-type]

    def decide(self, state: State) -> None:
        """BNP's decisions, applied to the model now (so that AC trains on the pruned model), then AC; the
        pipeline's ``prune`` pass re-applies the same zeros (idempotent) and ``rewrite`` adds the bounds."""
        from onnxclp.methods._staged import prune_now

        BNP.decide(self, state)  # type: ignore[arg-type]
        pruned = prune_now(state, "AC")
        AC.decide(self, state)
        state.decisions = pruned
