"""``fst-sau-gate``: the target gate with two repaired copies, FST's and SAU's (docs/algorithms.md, "The target
gate"; :mod:`onnxclp.methods.fst_gate`, :mod:`onnxclp.methods._gate`).

Not a published method. On the zoo the two repairs remove different backdoors (docs/results-repair.md, session
15, forced results at 500 images): FST's distilled copy behind fst-gate removed BadNets on the ResNets and
BppAttack and kept Blended's and VGG-BadNets' backdoors; SAU (Wei et al., NeurIPS 2023) at the first rate of its
walk removed Blended's and VGG-BadNets' and kept BppAttack's. Behind the gate a copy's clean damage only reaches
the images the input gives a suspected target, so the gate can hold both: where the input says a suspect (above
the bar), the written model answers with the first copy that disagrees, FST's, else SAU's, else the input's. A
triggered image keeps the target only where *both* copies keep it.

**The candidates**, one fixed sequence on the validation images, each moving at least the answers the one before
moved (:func:`onnxclp.methods.fst_gate.candidates` with ``sure``): FST's copy alone behind the first suspect where
the input's top probability is above 0.99 (fst-gate's first candidate, the run's end of FST's training); both
copies there; the same plus the copies' *sure* moves on the first suspect (at any confidence of the input, where a
copy disagrees and gives the input's answer less than 1/C of its probability: a copy that has unlearnt a trigger
gives the target little, while the clean target images a copy gets wrong mostly keep 0.1-0.4 of it); plus the
copies' *joint* moves on the first suspect (where every copy disagrees) above 0.9, 0.5 and 0; then either copy's
moves above 0.9, 0.5 and 0; then, for k = 2, 3, ..., the first k-1 suspects with the sure and joint moves on the
first k, then the first k. SAU's copy is trained only when FST's first candidate is within the budget. A model
gets the copies of the last candidate within. The sure and joint moves were added in session 17 (each written
down before measuring it: docs/results-repair-notes.md).

**The copies.** FST's as fst-gate's (``--lr``, ``--epochs``, ``--distill``, ``--distill-mix``). SAU's at one
rate, ``--sau-lr`` (default 0.001, the first of the repairs' walk: the rate at which SAU's zoo results in
docs/results-repair.md were taken), ``--sau-epochs`` (default 10, SAU's), distillation from the input weighted 1
(SAU's default), SAU's bound and steps (``--sau-eps``, ``--sau-steps``). The settings were written before this
method was measured; the choice of SAU as the second copy was made from the zoo's forced results, so the zoo is
not a test of that choice (docs/results-repair-notes.md, session 16).

Written: the input's nodes unchanged, a copy per used repair (``onnxclp.gate/``, ``onnxclp.gate2/``) and the
gate's nodes; about three times the input's compute when both copies are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxclp.methods import register
from onnxclp.methods.base import ParamSpec
from onnxclp.methods.fst_gate import FINE_CONFIDENCES, FSTGate, GateJudge, Judged
from onnxclp.methods.sau import EPS, STEPS, SAUObjective
from onnxclp.methods.sau_ac import SAU_EPOCHS

if TYPE_CHECKING:
    from onnxclp.pipeline import State

SAU_LR = ParamSpec("sau_lr", float, 0.001, "SGD learning rate of fst-sau-gate's SAU copy (cosine schedule; no walk).",
                   minimum=1e-6, maximum=1.0)  # fmt: skip
SAU_DISTILL = 1.0  # SAU's default weight of distillation from the input (methods/_repair.py DISTILL)


class GatedSAU(Judged, SAUObjective):
    """SAU's objective, its run's end judged through the gate (the first candidate with this copy)."""

    def __init__(self, eps: float, steps: int, judge: GateJudge) -> None:
        super().__init__(eps, steps)
        self.judge = judge


@register
class FSTSAUGate(FSTGate):
    name = "fst-sau-gate"
    order = 42
    description = ("The target gate with two copies, FST's then SAU's, consulted where the input answers a "
                   "suspected target class; adds two copies of the network.")  # fmt: skip
    paper = (
        "Min, Qin, Shen & Cheng, NeurIPS 2023 (FST); Wei, Zhang, Zha & Wu, NeurIPS 2023 (SAU); the target gate is "
        "onnxclp's"
    )
    # scan's next step names it (onnxclp.scanning.suggested_methods): the lowest average ASR under the guard at 500
    # clean images on the zoo, BN-folded exports, on both draws (shared: 4.6 % at 0.6 points; each model its own
    # images: 5.2 % at 1.5; fst-gate 32.5 % and 22.4 %; docs/results-repair.md). Its cost: three networks
    suggested = True
    params = (*FSTGate.params, SAU_LR, SAU_EPOCHS, EPS, STEPS)
    copies = 2
    sure_walk = True
    bars = FINE_CONFIDENCES  # session 18 (docs/results-repair-notes.md)

    def train_copy(self, state: State, judge: GateJudge) -> tuple[Any, Any, Any, Any]:
        from dataclasses import replace

        from onnxclp.defences.repair import train

        p = state.params
        settings = replace(self.settings(state), lr=float(p["sau_lr"]), epochs=int(p["sau_epochs"]),
                           distill=SAU_DISTILL, distill_mix=0.0)  # fmt: skip
        objective = GatedSAU(float(p["sau_eps"]), int(p["sau_steps"]), judge)
        module, outcome = train(state, objective, settings)  # type: ignore[arg-type]
        return module, outcome, settings, objective
