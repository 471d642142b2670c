"""Neural Cleanse: per-class trigger reverse-engineering on a few clean images.

Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019, section IV.

What the paper does: for each class ``t``, find the smallest trigger that sends clean images of the other classes
to ``t``. A trigger is a mask ``m`` (H x W, in [0, 1], shared by the channels) and a pattern ``p`` (C x H x W, in
the pixel range); the stamped image is ``(1 - m) * x + m * p``. The optimisation minimises
``CE(f(stamped), t) + lam * |m|_1`` with Adam, ``lam`` adjusted so that the trigger keeps sending >= 99 % of the
images to ``t``. A backdoor's target needs a far smaller mask than the other classes: the detection statistic is
the anomaly index of the smallest L1 norm, ``(median - min) / (1.4826 * MAD)`` over the classes, flagged above 2,
and its class is the detected target.

Where onnxclp's reading differs:
- A fixed budget of :data:`STEPS` Adam steps (lr 0.1, betas 0.5 / 0.9) per class on batches of :data:`BATCH`
  images, instead of the paper's epochs over the clean set with early stopping: measured on the zoo's CIFAR-10
  ResNets, 100 steps put the BadNets target's mask far below the others (docs/detect.md, "Neural Cleanse").
- ``lam`` starts at 1e-3 and follows the paper's schedule (x1.5 after :data:`PATIENCE` consecutive steps at >= 99 %
  success, /1.5 after as many below), without the paper's search for a first ``lam`` that reaches 99 %.
- The masks and patterns are parameterised by sigmoid and ``(tanh + 1) / 2`` (the authors' code does the same).
- The statistic becomes a p-value as the smallest of ``K`` normals, ``1 - Phi(index)^K``; the gate recalibrates it on
  clean models like every detector's (:mod:`onnxclp.detect._null`).

Inputs are pixel images (N, C, H, W) in [0, 1] on the model's device; ``forward`` maps them to the model's scores
(normalisation and layout are the caller's).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

STEPS = 300
BATCH = 64
LR = 0.1
LAMBDA = 1e-3
PATIENCE = 5
SUCCESS = 0.99


@dataclass
class CleanseResult:
    """What :func:`cleanse` found: per class the mask's L1 norm and the trigger's success on the other images."""

    l1: list[float]
    success: list[float]
    target: int  # the class with the smallest mask
    index: float  # the anomaly index of the smallest mask
    p_value: float
    steps: int
    images: int
    seconds: float
    masks: list[np.ndarray] = field(default_factory=list, repr=False)


def reverse_trigger(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: int,
                    steps: int = STEPS, batch: int = BATCH, seed: int = 0) -> tuple[np.ndarray, float]:  # fmt: skip
    """The smallest-mask trigger for ``target`` on ``x`` (images of the other classes, pixels in [0, 1]); returns
    the mask (H x W) and the share of ``x`` the final trigger sends to ``target``."""
    mask, _, hit = reverse_trigger_pattern(forward, x, target, steps, batch, seed)
    return mask, hit


def reverse_trigger_pattern(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, target: int,
                            steps: int = STEPS, batch: int = BATCH,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """:func:`reverse_trigger` with the pattern too: the mask (H x W), the pattern (C x H x W, pixels) and the
    share of ``x`` the trigger ``(1 - mask) x + mask pattern`` sends to ``target``."""
    gen = torch.Generator().manual_seed(seed)
    _, c, h, w = x.shape
    dev = x.device  # the generator stays on the CPU: the same draws on every device
    m_raw = torch.full((1, 1, h, w), -2.0, device=dev, requires_grad=True)
    p_raw = (torch.rand((1, c, h, w), generator=gen) * 2 - 1).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([m_raw, p_raw], lr=LR, betas=(0.5, 0.9))
    lam, up, down = LAMBDA, 0, 0
    n = min(batch, len(x))
    labels = torch.full((n,), target, dtype=torch.long, device=dev)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (n,), generator=gen).to(dev)
        m, p = torch.sigmoid(m_raw), (torch.tanh(p_raw) + 1) / 2
        scores = forward((1 - m) * x[idx] + m * p)
        loss = F.cross_entropy(scores, labels) + lam * m.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ok = float((scores.argmax(1) == target).float().mean()) >= SUCCESS
        up, down = (up + 1, 0) if ok else (0, down + 1)
        if up >= PATIENCE:
            lam, up = lam * 1.5, 0
        elif down >= PATIENCE:
            lam, down = lam / 1.5, 0
    with torch.no_grad():
        m, p = torch.sigmoid(m_raw), (torch.tanh(p_raw) + 1) / 2
        hits = sum(int((forward((1 - m) * x[i : i + 256] + m * p).argmax(1) == target).sum())
                   for i in range(0, len(x), 256))  # fmt: skip
    return m[0, 0].detach().cpu().numpy(), p[0].detach().cpu().numpy(), hits / max(len(x), 1)


def anomaly_index(l1: np.ndarray) -> float:
    """``(median - min) / (1.4826 * MAD)`` of the classes' mask norms (Neural Cleanse, section IV-B): the robust
    z-score of the smallest (:func:`onnxclp.detect.classifier.anomaly_index` of the negated norms)."""
    from onnxclp.detect.classifier import anomaly_index as robust_z

    return float(robust_z(-np.asarray(l1, dtype=np.float64)).max())


def cleanse(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            classes: int, steps: int = STEPS, batch: int = BATCH, seed: int = 0) -> CleanseResult:  # fmt: skip
    """Reverse-engineer a trigger per class (:func:`reverse_trigger`, each on the images not labelled with it) and
    the anomaly index of the smallest; ``forward`` maps pixel images to scores (N, classes)."""
    from onnxclp.detect import max_normal_p

    start = time.perf_counter()
    l1, success, masks = [], [], []
    for t in range(classes):
        others = x[y != t]
        if len(others) == 0:
            others = x
        mask, hit = reverse_trigger(forward, others, t, steps, batch, seed + t)
        l1.append(float(mask.sum()))
        success.append(hit)
        masks.append(mask)
    arr = np.asarray(l1)
    index = anomaly_index(arr)
    return CleanseResult(l1, success, int(arr.argmin()), index, max_normal_p(index, classes), steps, len(x),
                         time.perf_counter() - start, masks)  # fmt: skip
