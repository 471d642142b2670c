"""FreeEagle: data-free backdoor detection from the network's tail.

Fu, Wang, Guo, Li, Qian, Wang & Ji, "FreeEagle: Detecting Complex Neural Trojans in Data-Free Cases", USENIX
Security 2023 (section 4).

What the paper does: split the network at an intermediate layer into an extractor and a classifier tail. For each
class ``c``, optimise a dummy intermediate representation (uniform random start, Adam with an L2 penalty,
clamped at zero where the layer follows a ReLU) until the tail assigns it to ``c``; feed the optimised
representation back and read the softmax scores of every *other* class. A backdoor's target keeps a share of the
score whatever class the representation was optimised for (its trigger features are a shortcut the tail has
learnt), so the mean score of each class over the other classes' representations, ``v``, has an outlier: the
anomaly metric is ``(max v - Q3) / (Q3 - Q1)``, and the class of the maximum is the target.

Where onnxclp's reading differs:
- The split: any ONNX graph, not the paper's per-architecture choice. :meth:`onnxclp.bridge.OnnxModule.cuts` gives
  the tensors that separate the graph; the one chosen is the cut nearest :data:`SPLIT` of the way through the
  weighted layers (Conv, ConvTranspose, Gemm, MatMul) with at least one on each side. The rule (the middle) was
  written down before any measurement (docs/detect.md, "FreeEagle").
- All classes' representations are optimised in one batch. The loss is the *sum* of the per-class
  cross-entropies, so each representation gets the gradient the paper's one-image step gives it, and the L2
  penalty (Adam's ``weight_decay``) keeps the paper's weight.
- The metric becomes a p-value: for normal scores, ``Q3 = mu + 0.674 sigma`` and ``IQR = 1.349 sigma``, so the
  largest class's z-score is ``1.349 metric + 0.674``; its p-value is that of the largest of ``K`` normals. The
  gate recalibrates it on clean models like every detector's (:mod:`onnxclp.detect._null`).

The caller gives the bridged module (logits out, eval mode); nothing here reads images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from onnxclp.bridge import OnnxModule

STEPS = 1000  # the paper's
LR = 0.01  # the paper's Adam step
WEIGHT_DECAY = 0.005  # the paper's L2 penalty on the representation
SPLIT = 0.5  # the cut nearest the middle of the weighted layers (written down before measuring)
_WEIGHTED = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_NONNEGATIVE = frozenset({"Relu"})


@dataclass(frozen=True)
class Split:
    """Where the network is cut: the tensor, how far through the weighted layers it lies, whether it is
    non-negative (a ReLU's output: the representation is clamped at zero), and its shape for one image."""

    tensor: str
    position: float
    nonnegative: bool
    shape: tuple[int, ...] = ()


@dataclass
class FreeEagleResult:
    """FreeEagle's finding: ``scores[i, j]``, the softmax score of class ``j`` on the representation optimised for
    class ``i`` (diagonal zero); ``tendency[j]``, class ``j``'s mean score over the other classes'
    representations; ``metric`` the anomaly metric of the largest, ``target`` its class."""

    scores: np.ndarray = field(repr=False)
    tendency: np.ndarray
    metric: float
    target: int
    p_value: float
    reached: int  # classes whose optimised representation the tail assigns to them
    split: Split
    steps: int
    seconds: float


def _weighted_before(module: OnnxModule) -> tuple[list[int], int]:
    """Per plan step, the number of weighted layers run up to and including it; and their total."""
    counts, n = [], 0
    for op_type, _, _, _ in module._plan:
        n += op_type in _WEIGHTED
        counts.append(n)
    return counts, n


def choose_split(module: OnnxModule, at: float = SPLIT) -> Split | str:
    """The cut nearest ``at`` of the way through the weighted layers, with at least one weighted layer on each
    side (the later one on a tie); or why there is none."""
    counts, total = _weighted_before(module)
    options = []  # (distance from ``at``, minus the producer's step: the later cut wins a tie, step, name)
    for name in module.cuts():
        step = module._producer[name]
        if 0 < counts[step] < total:
            options.append((abs(counts[step] / total - at), -step, step, name))
    if not options:
        return (
            "no tensor separates the graph between two weighted layers (a branch read across the whole graph, "
            "or fewer than two weighted layers)"
        )
    _, _, step, name = min(options)
    return Split(name, counts[step] / total, module._plan[step][0] in _NONNEGATIVE)


def shape_at(module: OnnxModule, split: Split, image: torch.Tensor) -> Split:
    """``split`` with the shape its tensor has for one image (the model run once on ``image``, batch 1)."""
    seen: list[tuple[int, ...]] = []

    class _Record(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(x.shape[1:]))
            return x

    module.set_tap(split.tensor, _Record())
    try:
        with torch.no_grad():
            module(image)
    finally:
        module.remove_tap(split.tensor)
    return Split(split.tensor, split.position, split.nonnegative, seen[0])


def _logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(out.shape[0], -1)


def anomaly_metric(tendency: np.ndarray) -> float:
    """``(max - Q3) / (Q3 - Q1)`` over the non-zero entries, the quartiles read at positions ``int(0.25 n)`` and
    ``int(0.75 n)`` of the sorted values (FreeEagle, section 4.3); the IQR is floored at 1e-12."""
    a = np.sort(tendency[tendency != 0])
    if len(a) < 2:
        return 0.0
    q1, q3 = a[int(0.25 * len(a))], a[int(0.75 * len(a))]
    return float((a[-1] - q3) / max(q3 - q1, 1e-12))


def freeeagle(module: OnnxModule, split: Split, classes: int, steps: int = STEPS, lr: float = LR,
              weight_decay: float = WEIGHT_DECAY, seed: int = 0) -> FreeEagleResult:  # fmt: skip
    """FreeEagle on ``module`` cut at ``split`` (its :attr:`Split.shape` set, :func:`shape_at`): one
    representation per class optimised through the tail, then the anomaly metric of the classes' mean scores."""
    from onnxclp.detect import max_normal_p

    start = time.perf_counter()
    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same start on every device
    z = torch.rand((classes, *split.shape), generator=gen).to(dev).requires_grad_(True)
    labels = torch.arange(classes, device=dev)
    opt = torch.optim.Adam([z], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(_logits(module.forward_from(split.tensor, z)), labels, reduction="sum")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if split.nonnegative:
            with torch.no_grad():
                z.clamp_(min=0.0)
    with torch.no_grad():
        logits = _logits(module.forward_from(split.tensor, z))
        probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
    reached = int((logits.argmax(1) == labels).sum())
    scores = probs.copy()
    np.fill_diagonal(scores, 0.0)
    tendency = scores.sum(axis=0) / max(classes - 1, 1)
    metric = anomaly_metric(tendency)
    p = max_normal_p(1.349 * metric + 0.674, classes)
    return FreeEagleResult(scores, tendency, metric, int(tendency.argmax()), p, reached, split, steps,
                           time.perf_counter() - start)  # fmt: skip
