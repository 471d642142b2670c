"""FT-SAM: fine-tuning with sharpness-aware minimization (Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

The paper's observation: under plain fine-tuning on a few clean images the backdoor-related neurons, which have
larger norms, stay in their local minimum; sharpness-aware minimization with a radius larger than usual shrinks
them. Each step computes the gradient ``g`` of the loss at the weights ``w``, moves to the worst point of a
neighbourhood, ``w + e`` with (adaptive SAM, Kwon et al., ICML 2021, the paper's choice)

    e = rho * |w|^2 g / || |w| g ||          (elementwise; the norm over every trainable tensor)

computes the gradient there, returns to ``w`` and lets SGD step with that second gradient. The radius ``--rho``
is relative: the perturbation divided elementwise by ``|w|`` has L2 norm ``rho``. The loss is cross-entropy with
label smoothing 0.1 (the reference setting).

onnxclp's reading: the shared repair loop (:mod:`onnxclp.defences.repair`): augmented clean images, BatchNorm
re-inserted after BN-folded convolutions (its scale and shift are perturbed and trained too), distillation from
the input model (``--distill``; the paper has none, and its term is part of the loss SAM perturbs), the
checkpoint chosen by the accuracy guard. Two forward/backward passes per step (the loop's ``Objective.step``
hook). Rewrites initializer values only (docs/algorithms.md, "Fine-tuning repairs").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, DISTILL_MIX, EPOCHS, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective
    from onnxclp.pipeline import State

# BackdoorBench's FT-SAM configuration (rho_max = rho_min = 2.0, adaptive on) for the paper's CIFAR-10,
# GTSRB and Tiny-ImageNet runs; ASAM's own CIFAR setting is 0.5 to 1.0: "larger than usual".
RHO = ParamSpec("rho", float, 2.0, "FT-SAM: adaptive SAM radius (relative to |w|).", minimum=0.0, maximum=100.0)
LABEL_SMOOTHING = 0.1


class SAMObjective:
    """Cross-entropy with label smoothing; the update is adaptive SAM's two-pass step."""

    name = "ft-sam"

    def __init__(self, rho: float, adaptive: bool = True, label_smoothing: float = LABEL_SMOOTHING) -> None:
        self.rho = rho
        self.adaptive = adaptive
        self.label_smoothing = label_smoothing

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(scores, y, label_smoothing=self.label_smoothing)

    def step(self, module: OnnxModule, params: list[nn.Parameter], closure: Callable[[], torch.Tensor],
             opt: torch.optim.Optimizer) -> torch.Tensor:  # fmt: skip
        """Gradient at ``w``; move to ``w + e``; gradient there; back to ``w``; SGD step with that gradient."""
        import torch

        loss = closure()
        with torch.no_grad():
            live = [p for p in params if p.grad is not None]
            if not live or self.rho == 0.0:
                opt.step()
                return loss
            scaled = [(p.abs() * p.grad if self.adaptive else p.grad).norm(2) for p in live]
            norm = torch.linalg.vector_norm(torch.stack(scaled))
            scale = self.rho / (norm + 1e-12)
            kept = [p.detach().clone() for p in live]
            for p in live:
                p.add_((p * p if self.adaptive else 1.0) * p.grad * scale)
        closure()
        with torch.no_grad():
            for p, w in zip(live, kept, strict=True):
                p.copy_(w)
        opt.step()
        return loss

    def after_step(self, module: OnnxModule) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"rho": self.rho, "adaptive": self.adaptive, "label_smoothing": self.label_smoothing}


@register
class FTSAM(RepairMethod):
    name = "ft-sam"
    order = 32
    description = "Fine-tuning with adaptive sharpness-aware minimization, large radius (ICCV 2023); weights."
    paper = (
        "Zhu, Wei, Shen, Fan & Wu, Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware "
        "Minimization, ICCV 2023"
    )
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, RHO)

    def objective(self, state: State) -> Objective:
        return SAMObjective(float(state.params["rho"]))  # type: ignore[return-value]
