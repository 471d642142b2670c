"""What the fine-tuning repairs (ft, fst, ft-sam, i-bau, npd) share: their common parameters and ``decide``.

A repair trains the bridged model on the guard's fit images (:func:`onnxclp.defences.repair.train`) and leaves
the new initializer values in ``state.rewrites``; the pipeline's ``rewrite`` pass writes them and the guard's
``check`` pass measures the result on the validation images. Imported only by the repair modules; torch is
imported inside ``decide`` (the ``eval`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from onnxclp.methods.base import Method, ParamSpec

if TYPE_CHECKING:
    from onnxclp.defences.repair import Objective, Settings
    from onnxclp.pipeline import State

EPOCHS = ParamSpec("epochs", int, 20, "Training epochs over the clean images (repairs).", minimum=1, maximum=1000)
LR = ParamSpec(
    "lr",
    float,
    0.01,
    "SGD learning rate (repairs; cosine schedule). Not given: ft, fst, ft-sam, i-bau, sau and nc-unlearn train at "
    "0.001, 0.003, 0.01 while each run's end is within the budget on the validation images (tested in sequence; "
    "with --select-fraction: while a run has an epoch within it on the selection images), and keep the one "
    "furthest along its schedule.",
    minimum=1e-6,
    maximum=1.0,
)
# The learning rates a repair walks when --lr is not given, weakest first (the default, 0.01, is the last: the
# fine-tuning defences' papers train at it, with thousands of images; on a few hundred it moves a converged
# model's clean predictions far outside the budget, docs/algorithms.md "The learning-rate walk").
LR_LADDER = (0.001, 0.003, 0.01)
DISTILL = ParamSpec(
    "distill", float, 1.0, "Weight of distillation from the input model's outputs (repairs; 0 = off).", minimum=0.0
)
DISTILL_MIX = ParamSpec(
    "distill_mix",
    float,
    0.0,
    "Weight of distillation on mixup blends of the clean images (function matching; repairs; 0 = off).",
    minimum=0.0,
)
BATCH = ParamSpec("batch", int, 32, "Clean images per training step (repairs).", minimum=1, maximum=4096)


class RepairMethod(Method):
    """A repair: no score, no channel decisions; trains and rewrites initializer values."""

    needs = "clean-data"
    extra = "eval"
    score = None
    include_fc = False
    per_layer = False
    # what it changes: "weights" (initializer values), "nodes" (adds some) or "weights and nodes" (sau-ac)
    rewrites: ClassVar[str] = "weights"
    params: ClassVar[tuple[ParamSpec, ...]] = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH)

    def objective(self, state: State) -> Objective:
        raise NotImplementedError

    def settings(self, state: State) -> Settings:
        from onnxclp.defences.repair import Settings

        v = state.params.values
        return Settings(epochs=int(v["epochs"]), lr=float(v["lr"]), distill=float(v["distill"]),
                        distill_mix=float(v.get("distill_mix", 0.0)), batch=int(v["batch"]))  # fmt: skip

    def decide(self, state: State, make: Callable[[], Objective] | None = None) -> None:
        """Train at the given ``--lr``, or walk :data:`LR_LADDER` weakest first while each run's end passes the
        guard's test on the validation images (in sequence, the default), or while a run has an epoch within the
        budget on the selection images (``--select-fraction``), and keep, of the runs that had one, the checkpoint furthest along its
        schedule (the learning rate summed over its steps: 20 epochs at 0.001 go further than one at 0.003); the
        report's ``training.lr_ladder`` lists the runs (docs/algorithms.md, "The learning-rate walk"). ``make`` builds
        each run's objective (default: :meth:`objective`), for a method whose objectives share work done once."""
        from dataclasses import replace

        from onnxclp.defences.repair import finish, train

        settings = self.settings(state)
        given = "lr" in state.params.given
        runs: list[tuple[Any, Any, Objective, Settings, float | None]] = []
        ladder: list[dict[str, Any]] = []
        for lr in (settings.lr,) if given else LR_LADDER:
            objective, at = (make() if make is not None else self.objective(state)), replace(settings, lr=lr)
            module, outcome = train(state, objective, at)
            chosen = outcome.chosen_epoch
            travelled = None if chosen is None else float(outcome.curve[chosen - 1]["lr_epochs"])
            runs.append((module, outcome, objective, at, travelled))
            ladder.append({"lr": lr, "chosen_epoch": chosen, "lr_epochs": travelled,
                           "val_acc": outcome.curve[-1]["val_acc"], "drop": outcome.curve[-1]["drop"],
                           "passed": outcome.whole})  # fmt: skip
            # with a selection part a run with no epoch within budget ends the walk; in sequence, a run whose end
            # fails its test (the sequence has failed): Outcome.whole is both
            if not outcome.whole:
                break
        within = [r for r in runs if r[4] is not None]
        module, outcome, objective, used, _ = max(within, key=lambda r: r[4]) if within else runs[0]
        finish(state, module, outcome, used, objective)
        assert state.training is not None
        if not given:
            state.training["lr_ladder"] = ladder
            state.notes.append(
                f"{state.params.method}: lr "
                + (f"{used.lr:g} (epoch {outcome.chosen_epoch})" if within else "none within budget")
                + f" chosen on the {state.clean.selection_name} images"
                + (" (tested in sequence)" if outcome.sequential else "")
                + f" from {', '.join(f'{r:g}' for r in LR_LADDER)}"
            )
        state.decisions = []
