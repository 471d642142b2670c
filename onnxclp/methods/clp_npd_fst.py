"""``clp-npd-fst``: clp-npd, then fst-head's classifier shift on the polarized model, each stage within the budget.

Not a published method: CLP (Zheng et al., ECCV 2022), NPD (Zhu et al., NeurIPS 2023) and FST's classifier shift
with the features frozen (Min et al., NeurIPS 2023, section 4) in sequence. The three remove backdoors in three
places: outlying channels (CLP), features that adversarial perturbations of clean images share with a trigger
(NPD's polarizer), and the classifier's old association of a feature with the target (a classifier re-learnt from
clean images, pushed away from the old one). Measured on the zoo's three ResNets before this method was written
(500 clean images; docs/results-repair.md): clp-npd left BadNets 6.2 %, Blended 1.2 %, SIG 27.6 %; fst-head alone
SIG 0.0 % (at 1.6 points) but Blended 98 % and BadNets refused: those figures suggested the sequence, so those
models are not a test of it.

The rule: clp-npd as it is (``u`` tuned within a third of the budget, NPD's epoch the latest within the budget
against the input); then fst-head's alpha walk on the trained module (polarizer in place and frozen, only the
classifier trains, distilled from the polarized model), each alpha's latest epoch within the budget against the
*input* model; when no alpha is within budget the third stage is skipped and the result is clp-npd's (the report
says so). Testing in sequence (the default), the third stage runs only when NPD's end passed its test: its
candidates come after NPD's in one fixed sequence, which ends at the first failure (docs/algorithms.md, "Testing
candidates in sequence"). The report lists the pruned channels, the added node, the classifier rewritten, both trainings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxclp.methods import register
from onnxclp.methods.clp_npd import CLPNPD
from onnxclp.methods.fst_head import ALPHA, ALPHAS, FSTHead

if TYPE_CHECKING:
    from onnxclp.pipeline import State


@register
class CLPNPDFST(CLPNPD):
    name = "clp-npd-fst"
    order = 36
    description = "clp-npd, then the classifier re-learnt on the polarized model (fst-head); each stage in budget."
    paper = f"{CLPNPD.paper}; then {FSTHead.paper} (classifier only)"
    suggested = False
    params = (*CLPNPD.params, ALPHA)

    def decide(self, state: State) -> None:
        from onnxclp.defences.repair import finish

        module, npd_outcome = self.prune_then_polarize(state)
        npd_training = state.training
        if npd_outcome.failed:  # in sequence, NPD's end failed its test: the sequence ends (module docstring)
            state.notes.append(
                "clp-npd-fst: NPD's end failed its test on the validation images, which ends the sequence: the "
                "classifier stage is not run and the result is clp-npd's (the guard's check refuses it)"
            )
            return
        head = FSTHead()
        trained, outcome, objective, ladder, ok = head.walk(state, module)
        alphas = ", ".join(f"{a:g}" for a in ALPHAS)
        if ok:
            finish(state, trained, outcome, head.settings(state), objective)  # type: ignore[arg-type]
            assert state.training is not None
            state.training = {**state.training, "alpha_ladder": ladder, "npd": npd_training}
            state.notes.append(f"clp-npd-fst: classifier re-learnt at alpha {objective.alpha:g} (walked {alphas})")
        else:
            state.training = {**(npd_training or {}), "fst_alpha_ladder": ladder}
            state.notes.append(
                f"clp-npd-fst: no alpha ({alphas}) kept the classifier stage within the budget: skipped, the "
                "result is clp-npd's"
            )
