"""SAU: shared adversarial unlearning (Wei, Zhang, Zha & Wu, "Shared Adversarial Unlearning: Backdoor Mitigation
by Unlearning Shared Adversarial Examples", NeurIPS 2023).

The paper's bound (section 3): the backdoor risk of the repaired model is bounded by its risk on **shared
adversarial examples**, perturbed clean images that the input model and the repaired model both misclassify to
the *same* class. A backdoored input is one such example (the trigger is a perturbation both models follow to the
target), so unlearning the shared ones reaches the backdoor without knowing the trigger. Per training step on a
batch ``(x, y)`` of clean fit images (section 4, Algorithm 1):

1. **Maximisation** (one perturbation per image, in the images' [0, 1] pixel range, L-infinity bound
   ``--sau-eps``): ``--sau-steps`` signed-gradient steps of size ``eps``, starting at ``+eps`` everywhere, that
   lower ``BETA_ADV * L_adv + BETA_SHARE * L_share``. ``L_adv`` is minus the cross-entropy of each model on the
   images it still classifies as on the clean image (so that the step makes them adversarial), averaged over the
   two models; ``L_share`` the Jensen-Shannon divergence between the two models' predictions on the images not
   yet shared (so that the step makes them misclassify alike). Both models are read in eval mode; the steps stop
   early once every image is shared.
2. **Unlearning**: ``CE(f(x), y) + SHARED_WEIGHT * L_sar`` (plus the loop's distillation from the input model on
   the clean images). ``L_sar`` is, over the images the **input** model sends, under the perturbation, to a class
   other than the true one and other than its clean prediction, ``-log(1 - p(t | x + delta))`` with ``t`` that
   class and ``p`` the repaired model's probabilities (read in eval mode): the repaired model is pushed off every
   adversarial class the input model takes, whether or not it shares it yet.

Settings, from the reference implementation's CIFAR-10 configuration (BackdoorBench's ``sau`` defence): bound
0.2, 5 steps of 0.2, start at the bound, weights 0.01 and 1 in the maximisation, 1 on the shared loss; the
adversarial cross-entropy term (``lmd_2``) off, as there. The perturbation is not clipped to the image range
(the reference's choice: the bound, not the pixel range, is what matters for unlearning).

Where onnxclp differs from the reference: the shared repair loop (SGD with momentum and a cosine schedule, the
learning-rate walk, augmentation, BatchNorm re-inserted on BN-folded exports, distillation, the guard-chosen
checkpoint) instead of Adam at 1e-4 for 100 epochs on 2,500 images; the clean cross-entropy reads the loop's
train-mode scores (the reference reads eval-mode scores); default 10 epochs (each step costs about twelve
forward-and-backward passes; docs/algorithms.md, "SAU"). Rewrites initializer values only.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from onnxclp.methods import register
from onnxclp.methods._repair import BATCH, DISTILL, DISTILL_MIX, LR, RepairMethod
from onnxclp.methods.base import ParamSpec

if TYPE_CHECKING:
    import torch
    from torch import nn

    from onnxclp.bridge import OnnxModule
    from onnxclp.defences.repair import Objective
    from onnxclp.methods.ibau import PixelSpace
    from onnxclp.pipeline import State

EPOCHS = ParamSpec("epochs", int, 10, "Training epochs over the clean images (repairs).", minimum=1, maximum=1000)
EPS = ParamSpec("sau_eps", float, 0.2, "SAU: L-infinity bound of each image's perturbation, in [0, 1] pixel units.",
                minimum=0.0, maximum=1.0)  # fmt: skip
STEPS = ParamSpec("sau_steps", int, 5, "SAU: signed-gradient steps of the shared adversarial search per training "
                  "step.", minimum=1, maximum=100)  # fmt: skip
BETA_ADV = 0.01  # the maximisation's weight on the adversarial term (the reference's beta_1)
BETA_SHARE = 1.0  # ... and on the sharing term (beta_2)
SHARED_WEIGHT = 1.0  # the unlearning's weight on the shared adversarial loss (lmd_3)
P_FLOOR = 1e-3  # an adversarial class the repaired model gives less than this adds no gradient (the reference's clamp)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row between two probability matrices (natural log)."""
    p, q = p.clamp_min(1e-8), q.clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * ((p * (p.log() - m.log())).sum(1) + (q * (q.log() - m.log())).sum(1))


def shared_loss(probs: torch.Tensor, adv_class: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``L_sar``: the sum over the ``counted`` images of ``-log(1 - p(adv_class))`` (``p`` floored at
    :data:`P_FLOOR`, so a class already given up adds nothing), divided by the batch size."""
    import torch

    p = probs.gather(1, adv_class[:, None])[:, 0].clamp(min=P_FLOOR)
    terms = -torch.log1p(1e-6 - p)
    return (terms * counted.to(terms.dtype)).sum() / probs.shape[0]


class SAUObjective:
    """The two steps of the module docstring; the input model is a frozen copy made when training starts."""

    name = "sau"

    def __init__(self, eps: float, steps: int) -> None:
        self.eps = eps
        self.steps = steps
        self.space: PixelSpace | None = None
        self.reference: OnnxModule | None = None
        self.searched = 0  # images searched
        self.shared = 0  # of them, shared adversarial when the search ended
        self.unlearned = 0  # of them, counted in L_sar (the input model sent them to another class)
        self.adversarial: list[int] = []  # of those, how many the input model sent to each class

    def prepare(self, module: OnnxModule, state: State) -> list[nn.Parameter]:
        from onnxclp.methods.ibau import PixelSpace

        # the loop re-inserted BatchNorm before this: each inserted layer is the identity in eval mode, so the
        # frozen copy computes the input model
        self.reference = copy.deepcopy(module).eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)
        x = state.clean.x_fit[:1].to(next(iter(module.parameters())).device)
        self.space = PixelSpace(state, x)
        return [p for p in module.parameters() if p.requires_grad]

    def _eval_logits(self, module: OnnxModule, x: torch.Tensor) -> torch.Tensor:
        from onnxclp.defences.repair import logits_of

        was = module.training
        module.eval()
        try:
            return logits_of(module(x))
        finally:
            module.train(was)

    def search(self, module: OnnxModule, x: torch.Tensor, y: torch.Tensor, clean_ref: torch.Tensor) -> torch.Tensor:
        """The maximisation: each image's perturbation (pixel units, detached), L-infinity at most ``eps``;
        ``clean_ref`` is the input model's prediction on each clean image."""
        import torch
        import torch.nn.functional as F

        assert self.space is not None and self.reference is not None
        with torch.no_grad():
            clean = self._eval_logits(module, x).argmax(1)
        delta = torch.full_like(x, self.eps)
        shared = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            xp = self.space.add(x, delta)
            s = self._eval_logits(module, xp)
            r = self._eval_logits(self.reference, xp)
            ps, pr = s.argmax(1), r.argmax(1)
            hit, hit_ref = ps != clean, pr != clean_ref
            shared = hit & hit_ref & (ps == pr)
            adv = -((F.cross_entropy(s, y, reduction="none") * (~hit)).sum()
                    + (F.cross_entropy(r, y, reduction="none") * (~hit_ref)).sum()) / (2 * len(x))  # fmt: skip
            share = (js_divergence(s.softmax(1), r.softmax(1)) * (~shared)).sum() / len(x)
            (g,) = torch.autograd.grad(BETA_ADV * adv + BETA_SHARE * share, delta)
            delta = (delta.detach() - self.eps * g.sign()).clamp(-self.eps, self.eps)
            if bool(shared.all()):
                break
        self.searched += len(x)
        self.shared += int(shared.sum())
        return delta.detach()

    def loss(self, module: OnnxModule, x: Any, y: Any, scores: Any) -> Any:
        import torch
        import torch.nn.functional as F

        assert self.space is not None and self.reference is not None
        clean = F.cross_entropy(scores, y)
        if self.eps == 0.0:
            return clean
        with torch.no_grad():
            clean_ref = self._eval_logits(self.reference, x).argmax(1)
        xp = self.space.add(x, self.search(module, x, y, clean_ref))
        with torch.no_grad():
            adv_ref = self._eval_logits(self.reference, xp).argmax(1)
        counted = (adv_ref != y) & (adv_ref != clean_ref)
        self.unlearned += int(counted.sum())
        per_class = torch.bincount(adv_ref[counted], minlength=scores.shape[1]).tolist()
        self.adversarial = [a + b for a, b in zip(self.adversarial or [0] * len(per_class), per_class, strict=True)]
        probs = self._eval_logits(module, xp).softmax(1)
        return clean + SHARED_WEIGHT * shared_loss(probs, adv_ref, counted)

    def after_step(self, module: OnnxModule) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"sau_eps": self.eps, "sau_steps": self.steps, "perturbation_units": "L-infinity in [0, 1] pixels",
                "beta_adv": BETA_ADV, "beta_share": BETA_SHARE, "shared_weight": SHARED_WEIGHT,
                "searched": self.searched, "shared_at_end": self.shared, "unlearned": self.unlearned,
                "unlearned_per_class": self.adversarial}  # fmt: skip


@register
class SAU(RepairMethod):
    name = "sau"
    order = 33
    description = "Unlearning adversarial examples shared with the input model (NeurIPS 2023); weights."
    paper = (
        "Wei, Zhang, Zha & Wu, Shared Adversarial Unlearning: Backdoor Mitigation by Unlearning Shared "
        "Adversarial Examples, NeurIPS 2023"
    )
    params = (EPOCHS, LR, DISTILL, DISTILL_MIX, BATCH, EPS, STEPS)

    def objective(self, state: State) -> Objective:
        v = state.params.values
        return SAUObjective(float(v["sau_eps"]), int(v["sau_steps"]))  # type: ignore[return-value]
