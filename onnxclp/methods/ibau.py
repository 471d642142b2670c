"""i-BAU: adversarial unlearning of backdoors via implicit hypergradient (Zeng, Chen, Park, Mao, Jin & Jia,
"Adversarial Unlearning of Backdoors via Implicit Hypergradient", ICLR 2022).

The minimax ``min_theta max_{||delta|| <= eps} H(delta, theta)`` with ``H`` the cross-entropy of the model on
the clean images plus one **universal** perturbation ``delta`` (one pattern for every image, as a trigger is):
the inner maximisation finds the pattern that most breaks the model, the outer minimisation unlearns it.

What onnxclp computes, per training step on a batch ``(x, y)`` of the clean fit images:

1. **Inner maximisation**: ``--ibau-steps`` projected gradient-ascent steps (L2-normalised, step
   ``2.5 eps / steps``) on ``H(delta) = CE(f(x + delta), y)``, warm-started from the previous step's ``delta``
   (so the universal pattern is carried over the whole fit set and follows the model as it changes).
2. **Outer loss** ``CE(f(x), y) + H(delta, theta)`` (clean and perturbed images weighted equally; plus the
   loop's distillation term on the clean images).
3. **Implicit hypergradient** (the paper's Algorithm 1, section 3): ``delta*(theta)`` is the fixed point of the
   projected ascent map ``Phi(delta, theta) = P(delta + alpha grad_delta H)`` (``alpha`` 0.1, the reference's
   inner step; ``P`` the projection on the ball, differentiated too), so the outer gradient has the extra term
   ``(d Phi / d theta)^T v`` with ``v = (I - d Phi / d delta)^-T grad_delta H``, approximated by ``--ibau-k``
   fixed-point iterations ``v <- (d Phi / d delta)^T v + grad_delta H`` from ``v = 0`` (vector-Jacobian
   products through double back-propagation; the iteration stops early when it diverges).
   ``--ibau-k 0`` drops the term: the first-order (Danskin) alternation. The perturbed outer loss is the inner
   objective itself, so at an exact inner optimum the term vanishes (Danskin's theorem); it corrects for the
   inner problem being solved by a few warm-started steps on the current batch.

Units: ``delta`` lives in the images' [0, 1] pixel range, before ``--mean``/``--std`` (it is divided by the
per-channel std before it is added to the normalised input); ``--ibau-eps`` is its **per-pixel RMS bound**,
``||delta||_2 <= eps * sqrt(C H W)``. The default 0.18 is the reference implementation's L2 radius 10 on
32x32x3 images (10 / sqrt(3072)), written per pixel so that it carries over to other input sizes; it covers
the common triggers (a BadNets patch, a blend at 0.2, SIG, WaNet all have a per-pixel RMS of 0.05 to 0.1).

Where it differs from the paper and its reference code: the reference re-initialises ``delta`` every round and
fits it in one pass over the data with a soft L2 penalty (the hard bound is commented out), perturbs 1 % of each
outer batch, and uses Adam; onnxclp uses a hard bound, perturbs the whole batch alongside the clean one, warm
starts ``delta`` across steps and uses the shared loop (SGD with momentum, cosine schedule, augmentation,
BatchNorm re-inserted, distillation, guard-chosen checkpoint). Default 5 epochs: the reference's 5 rounds of
one pass each. Rewrites initializer values only (docs/algorithms.md, "Fine-tuning repairs").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, DISTILL_MIX, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective
    from onnxclp.pipeline import State

EPOCHS = ParamSpec("epochs", int, 5, "Training epochs over the clean images (repairs).", minimum=1, maximum=1000)
EPS = ParamSpec("ibau_eps", float, 0.18, "i-BAU: per-pixel RMS bound of the universal perturbation, in [0, 1] "
                "pixel units.", minimum=0.0, maximum=1.0)  # fmt: skip
STEPS = ParamSpec("ibau_steps", int, 5, "i-BAU: gradient-ascent steps on the perturbation per training step.",
                  minimum=1, maximum=100)  # fmt: skip
K = ParamSpec("ibau_k", int, 5, "i-BAU: fixed-point iterations of the implicit hypergradient (0 = first order).",
              minimum=0, maximum=50)  # fmt: skip
ALPHA = 0.1  # step of the fixed-point map (the reference's inner GradientDescent step)


class PixelSpace:
    """How a perturbation in the images' [0, 1] pixel range enters the model's normalised input: divided by the
    per-channel ``std`` of ``--std``; ``lo``/``hi`` are the normalised values of 0 and 1 (shaped to broadcast
    over a batch in the model's layout)."""

    def __init__(self, state: State, like: torch.Tensor) -> None:
        import torch

        from onnxclp.defences._inputs import normaliser
        from onnxclp.errors import OnnxclpError
        from onnxclp.methods._fewshot import input_layout

        layout, channels, hw = input_layout(state)
        ctx = state.options.context
        shape = (channels, *hw) if layout == "nchw" else (*hw, channels)
        try:
            norm = normaliser(shape, ctx.get("mean"), ctx.get("std"), 1 if layout == "nchw" else -1, like.device)
        except ValueError as exc:
            raise OnnxclpError(f"--mean/--std: {exc}") from exc
        cshape = [1, channels, 1, 1] if layout == "nchw" else [1, 1, 1, channels]
        if norm is None:
            mean = torch.zeros(cshape, device=like.device)
            std = torch.ones(cshape, device=like.device)
        else:
            mean, std = norm
        self.std = std.to(like.dtype)
        self.lo = ((0.0 - mean) / std).to(like.dtype)
        self.hi = ((1.0 - mean) / std).to(like.dtype)
        self.shape = tuple(like.shape[1:])
        self.numel = math.prod(self.shape)

    def add(self, x: torch.Tensor, delta: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        """``x`` (normalised) plus ``delta`` (pixel units); optionally kept inside the [0, 1] image range."""
        import torch

        out = x + delta / self.std
        return torch.maximum(torch.minimum(out, self.hi), self.lo) if clamp else out

    def radius(self, rms: float) -> float:
        """The L2 radius of a per-pixel RMS bound."""
        return rms * math.sqrt(self.numel)


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of ``delta`` (one per image, or the single universal one) scaled into the L2 ball (differentiable)."""
    import torch

    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = torch.clamp(radius / norms, max=1.0)
    return delta * factor.reshape(-1, *([1] * (delta.ndim - 1)))


def l2_direction(g: torch.Tensor) -> torch.Tensor:
    """``g`` with each row scaled to unit L2 norm (zero rows stay zero)."""
    norms = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return g / norms.reshape(-1, *([1] * (g.ndim - 1)))


def implicit_term(phi: torch.Tensor, delta: torch.Tensor, g_out: torch.Tensor, k: int) -> tuple[torch.Tensor, bool]:
    """A zero-valued term whose gradient in the parameters is the implicit part of the hypergradient,
    ``(d Phi / d theta)^T v`` with ``v = sum_{j < k} ((d Phi / d delta)^T)^j g_out`` (``k`` fixed-point iterations
    of ``v <- (d Phi / d delta)^T v + g_out`` from 0: a truncated Neumann series for ``(I - d Phi / d delta)^-T``).

    ``phi`` is the fixed-point map evaluated at ``delta`` (which requires grad) with its graph in the parameters
    kept (``create_graph``); ``g_out`` the outer loss's gradient in ``delta``. The iteration stops early (second
    value True) when it diverges (not finite, or 1000 times ``g_out``'s norm): the map does not contract there.
    """
    import torch

    if k <= 0:
        return phi.sum() * 0.0, False
    v = g_out.clone()
    limit = 1e3 * float(g_out.norm()) + 1e-12
    cut_short = False
    for _ in range(k - 1):
        (jv,) = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)
        nxt = jv + g_out
        if not bool(torch.isfinite(nxt).all()) or float(nxt.norm()) > limit:
            cut_short = True
            break
        v = nxt
    term = (phi * v.detach()).sum()
    return term - term.detach(), cut_short


class IBAUObjective:
    """The minimax of the module docstring; ``delta`` persists across steps."""

    name = "i-bau"

    def __init__(self, eps: float, steps: int, k: int) -> None:
        self.eps = eps
        self.steps = steps
        self.k = k
        self.space: PixelSpace | None = None
        self.delta: torch.Tensor | None = None
        self.diverged = 0  # steps whose fixed-point iteration was cut short

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        import torch

        x = state.clean.x_fit[:1].to(next(iter(module.parameters())).device)
        self.space = PixelSpace(state, x)
        self.delta = torch.zeros((1, *self.space.shape), dtype=x.dtype, device=x.device)
        return [p for p in module.parameters() if p.requires_grad]

    def _ce(self, module: OnnxModule, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        from onnxclp.defences.repair import logits_of

        assert self.space is not None
        return F.cross_entropy(logits_of(module(self.space.add(x, delta))), y)

    def _maximise(self, module: OnnxModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import torch

        assert self.space is not None and self.delta is not None
        radius = self.space.radius(self.eps)
        step = 2.5 * radius / self.steps
        delta = self.delta.detach()
        for _ in range(self.steps):
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad(self._ce(module, x, delta, y), delta)
            delta = project_l2(delta.detach() + step * l2_direction(g), radius).detach()
        self.delta = delta
        return delta

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import torch
        import torch.nn.functional as F

        assert self.space is not None
        clean = F.cross_entropy(scores, y)
        if self.eps == 0.0:
            return clean
        delta = self._maximise(module, x, y).detach().requires_grad_(True)
        adv = self._ce(module, x, delta, y)
        if self.k == 0:
            return clean + adv
        # grad_delta H, kept differentiable in theta: it is both the outer loss's gradient in delta and the
        # ascent direction of the fixed-point map Phi
        (g,) = torch.autograd.grad(adv, delta, create_graph=True)
        phi = project_l2(delta + ALPHA * g, self.space.radius(self.eps))
        term, cut_short = implicit_term(phi, delta, g.detach(), self.k)
        self.diverged += cut_short
        return clean + adv + term

    def after_step(self, module: OnnxModule) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ibau_eps": self.eps, "ibau_steps": self.steps, "ibau_k": self.k,
                               "perturbation_units": "per-pixel RMS in [0, 1] pixel range"}  # fmt: skip
        if self.space is not None:
            out["l2_radius"] = self.space.radius(self.eps)
        if self.delta is not None:
            out["final_delta_l2"] = float(self.delta.norm())
        if self.diverged:
            out["hypergradient_cut_short"] = self.diverged
        return out


@register
class IBAU(RepairMethod):
    name = "i-bau"
    order = 33
    description = "Adversarial unlearning of a universal perturbation, implicit hypergradient (ICLR 2022); weights."
    paper = (
        "Zeng, Chen, Park, Mao, Jin & Jia, Adversarial Unlearning of Backdoors via Implicit Hypergradient, ICLR 2022"
    )
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, EPS, STEPS, K)

    def objective(self, state: State) -> Objective:
        v = state.params.values
        return IBAUObjective(float(v["ibau_eps"]), int(v["ibau_steps"]), int(v["ibau_k"]))  # type: ignore[return-value]
