"""What the fine-tuning repairs (ft, fst, ft-sam, i-bau, npd) share: their common parameters and ``decide``.

A repair trains the bridged model on the guard's fit images (:func:`onnxclp.defences.repair.train`) and leaves
the new initializer values in ``state.rewrites``; the pipeline's ``rewrite`` pass writes them and the guard's
``check`` pass measures the result on the validation images. Imported only by the repair modules; torch is
imported inside ``decide`` (the ``eval`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from onnxclp.methods.base import Method, ParamSpec

if TYPE_CHECKING:
    from onnxclp.defences.repair import Objective, Settings
    from onnxclp.pipeline import State

EPOCHS = ParamSpec("epochs", int, 20, "Training epochs over the clean images (repairs).", minimum=1, maximum=1000)
LR = ParamSpec("lr", float, 0.01, "SGD learning rate (repairs; cosine schedule).", minimum=1e-6, maximum=1.0)
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
    rewrites: ClassVar[str] = "weights"  # what it changes: "weights" (initializer values) or "nodes" (adds some)
    params: ClassVar[tuple[ParamSpec, ...]] = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH)

    def objective(self, state: State) -> Objective:
        raise NotImplementedError

    def settings(self, state: State) -> Settings:
        from onnxclp.defences.repair import Settings

        v = state.params.values
        return Settings(epochs=int(v["epochs"]), lr=float(v["lr"]), distill=float(v["distill"]),
                        distill_mix=float(v.get("distill_mix", 0.0)), batch=int(v["batch"]))  # fmt: skip

    def decide(self, state: State) -> None:
        from onnxclp.defences.repair import finish, train

        objective = self.objective(state)
        settings = self.settings(state)
        module, outcome = train(state, objective, settings)
        finish(state, module, outcome, settings, objective)
        state.decisions = []


def describe_repair(cls: Any) -> str:
    """``onnxclp methods``' note of what a repair changes."""
    return "adds nodes" if getattr(cls, "rewrites", "") == "nodes" else "rewrites weights"
