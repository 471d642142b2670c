"""``sau-ac``: SAU's unlearning within two thirds of the budget, then activation clipping (``ac``) on the result.

Not a published method: shared adversarial unlearning (Wei, Zhang, Zha & Wu, NeurIPS 2023, section 4;
:mod:`onnxclp.methods.sau`) and activation clipping (after Wang et al., arXiv 2308.04617;
:mod:`onnxclp.methods.ac`) in sequence. Why the pair (docs/algorithms.md, "sau-ac"), written before its rows were
measured: at 500 images they reach different backdoors. Forced, SAU took Blended to 0.3 %, VGG-BadNets to 5 % and
preact-BadNets to 12 % and left the ResNet BadNets patch at 38 %; AC took SIG to 12 % and the ResNet BadNets
patches to 12-17 % and left Blended above 99 % (docs/results-repair.md). Those figures suggested the pair, so the
zoo models they came from are not a test of it.

The pipeline:

1. **SAU**, at its own settings (``--sau-epochs``, default 10; the learning-rate walk, as ``--method sau``
   without ``--lr``; ``--sau-eps``, ``--sau-steps``; ``--distill`` and ``--batch`` shared with the second stage),
   its checkpoint chosen within :attr:`SAUAC.first_share` of ``--max-acc-drop`` (by default each run's end tested
   in sequence on the validation images; with ``--select-fraction``, on the selection images). Its new
   initializer values are written into the model now, so that the second stage trains on the unlearned model.
2. **AC** on that model, with ``--epochs``, ``--lr`` and ``--ac-weight`` (its weight walk unless given); its
   epochs and weights are measured against the *input* model's accuracy with the whole budget, so the guard's
   final check covers both stages, as for every repair.

Testing in sequence (the default), the candidates form one fixed sequence: SAU's runs, then AC's on the strongest
of them. A failed run ends it: when one of SAU's runs fails its test, AC does not run and the result is SAU's last
accepted run (refused by the guard's check when none passed). AC on a weaker SAU run would make AC's sequence
depend on that test's outcome, a branch the one-sequence guarantee does not cover (docs/algorithms.md, "Testing
candidates in sequence").

Written: SAU's rewritten initializers (the report's ``rewritten``, as ``training.first_stage.rewritten``) and one
``Min`` node per clipped tensor (``added_nodes``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from onnxclp.methods import register
from onnxclp.methods.ac import AC
from onnxclp.methods.base import ParamSpec
from onnxclp.methods.sau import EPS, SAU, STEPS

if TYPE_CHECKING:
    from onnxclp.pipeline import State

SAU_EPOCHS = ParamSpec("sau_epochs", int, 10, "Training epochs of SAU: sau-ac's first stage (--epochs is AC's) and "
                       "fst-sau-gate's second copy (--epochs is FST's copy's).", minimum=1, maximum=1000)  # fmt: skip


@register
class SAUAC(AC):
    name = "sau-ac"
    order = 40
    description = "SAU's unlearning within 2/3 of the budget, then activation clipping (ac); weights and nodes."
    paper = f"{SAU.paper}; then {AC.paper}"
    rewrites = "weights and nodes"
    first_share: ClassVar[float] = 2.0 / 3.0  # SAU's share of --max-acc-drop; AC measures the rest against the input
    params = (*AC.params, SAU_EPOCHS, EPS, STEPS)

    def decide(self, state: State) -> None:
        """SAU (its checkpoint within ``first_share`` of the budget), its values written into the model now, then
        AC on the unlearned model; the pipeline's ``rewrite`` pass writes SAU's values again (the same ones) and
        adds AC's bounds."""
        first = self.unlearn_first(state)
        if ended_in_sequence(first):
            state.training = first
            state.decisions = []
            state.notes.append(
                "sau-ac: a run of the SAU stage failed its test on the validation images, which ends the sequence: "
                "AC is not run and the result is SAU's last accepted run (module docstring)"
            )
            return
        AC.decide(self, state)
        assert state.training is not None
        state.training["first_stage"] = first
        # AC rewrites no initializer: what the written model has rewritten is SAU's (the report's ``rewritten``)
        state.training["rewritten"] = first["rewritten"]
        state.training["largest_relative_change"] = first["largest_relative_change"]
        state.notes.append(
            f"sau-ac: SAU rewrote {len(first['rewritten'])} initializers (largest relative change "
            f"{first['largest_relative_change']:.3g}) within {self.first_share:.2g} of the budget, then AC added "
            "its bounds on the unlearned model"
        )

    def unlearn_first(self, state: State) -> dict[str, Any]:
        """The SAU stage: run at its own parameters and a share of the budget, its values applied to the model's
        initializers now; returns its training record (the report's ``training.first_stage``)."""
        from onnxclp.passes.rewrite import write_rewrites

        v = state.params.values
        sau_values = {p.name: p.default for p in SAU.params}  # SAU's defaults, but what sau-ac passes on
        sau_values.update(epochs=int(v["sau_epochs"]), distill=v["distill"], batch=v["batch"],
                          sau_eps=v["sau_eps"], sau_steps=v["sau_steps"])  # fmt: skip
        params, guard = state.params, state.guard
        full = guard.budget if guard is not None else None
        state.params = replace(params, values=sau_values, given=frozenset())  # no --lr: SAU walks its rates
        if guard is not None:
            guard.budget = full * self.first_share  # type: ignore[operator]
        try:
            SAU().decide(state)
        finally:
            state.params = params
            if guard is not None:
                guard.budget = full  # type: ignore[assignment]
        assert state.training is not None
        write_rewrites(state)
        first = dict(state.training)
        first["budget_share"] = self.first_share
        return first


def ended_in_sequence(training: dict[str, Any]) -> bool:
    """Whether a stage's candidates, tested in sequence, ended at a failed one (a run of its learning-rate walk, or
    its single run when ``--lr`` was given): the sequence ends there, and no later stage may run."""
    if not training.get("tested_in_sequence"):
        return False
    ladder = training.get("lr_ladder")
    if ladder:
        return any(not step.get("passed", True) for step in ladder)
    return bool(training.get("failed_in_sequence"))
