"""ANP: adversarial neuron pruning on a few clean images (through onnxclp.bridge).

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021 (arXiv:2110.14430).

The paper's finding (section 3): a backdoored network collapses, predicting the target class on clean
images, when its neurons are perturbed by a small relative amount; a clean network does not. A neuron ``k``
with weight ``w_k`` and bias ``b_k`` is perturbed multiplicatively, ``(1 + delta_k) w_k`` and
``(1 + xi_k) b_k`` with ``|delta_k|, |xi_k| <= eps``. ANP (section 4, Algorithm 1) learns a mask
``m_k in [0, 1]`` per neuron on clean labelled images, minimising

    alpha * L(m * w, b) + (1 - alpha) * max_{|delta|, |xi| <= eps} L((m + delta) * w, (1 + xi) * b)

(the inner maximum by one projected signed-gradient step from a random start), then prunes the neurons with
the lowest masks. Neurons that only serve the backdoor do nothing on clean images, so the natural term leaves
their masks free, while the robust term pushes them to 0 (perturbed, they fire on clean images and drive the
prediction to the target class).

:func:`anp_masks` is the optimisation on an :class:`~onnxclp.bridge.OnnxModule`; it returns the learned mask
of every neuron group it is given, the loss curve and why it stopped, and never modifies the module's
parameters (the masks and perturbations enter through ``torch.func.functional_call``). What a neuron is
(:class:`NeuronGroup`):

- a BatchNorm inserted on the bridged module (``tap`` set: after a BN-folded convolution,
  :func:`onnxclp.defences.repair.insert_batchnorm`, or after a kept BatchNormalization, :func:`batchnorm_after`;
  scale ``sqrt(var + eps)`` and shift ``mean`` of the channel on the clean images, the identity in eval mode):
  mask on its scale, perturbation of its scale and shift, as the paper does for networks with BatchNorm
  (section 4.1: the BN scale and shift stand for the neuron's weight and bias). With ``bn_train`` it
  normalises each batch with the batch's statistics, as the reference code runs its BatchNorms (train mode):
  the perturbation of one layer is then renormalised by the next instead of compounding through the depth. In
  eval mode it is ``(m + delta)(y - mean) + (1 + xi) mean`` on the tapped tensor ``y``;
- a BatchNormalization kept after the layer, no tap: the BN channel (mask on ``gamma``, perturbation of
  ``gamma`` and ``beta``), on its running statistics;
- otherwise the output channels of a Conv/Gemm/MatMul weight (mask on the weight's output-channel slice,
  perturbation of the slice and of the bias).

Iterations run until the objective converges (:func:`converged`: the mean loss of the last ``window``
iterations improves on the window before by less than ``tol``, relative), at most ``iterations`` (the paper's
2000). Pruning: :func:`choose_count` picks the number of lowest-mask neurons with the accuracy guard's rule
(:func:`onnxclp.guard.choose_strongest`, the validation images the masks never saw); without validation images
:func:`prune_by_threshold` is the paper's rule (mask below 0.2).

Where onnxclp's reading differs is in docs/algorithms.md, "ANP".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

EPS = 0.4
ALPHA = 0.2
LR = 0.2
MOMENTUM = 0.9
BATCH = 128
THRESHOLD = 0.2
ITERATIONS = 2000  # the paper's; the most the stopping rule allows
WINDOW = 100  # iterations per window of the stopping rule
TOL = 0.01  # relative improvement of a window's mean loss below which the objective has converged


@dataclass(frozen=True)
class NeuronGroup:
    """The neurons of one layer.

    ``scale``/``shift``: the layer's initializers that pruning zeroes (a Conv/Gemm weight, its neurons along
    ``axis``, and its bias; or a kept BatchNormalization's ``gamma`` and ``beta``, axis 0); ``shift`` None: no
    per-neuron bias. ``tap``: the tensor after which a BatchNorm was inserted on the bridged module
    (``module.set_tap``: a BN-folded convolution's output, or a kept BatchNormalization's): the mask and
    perturbation then act on that BatchNorm's ``weight`` and ``bias`` instead of ``scale`` and ``shift``.
    ``channels``: how many neurons.
    """

    key: str
    scale: str
    axis: int
    channels: int
    shift: str | None = None
    tap: str | None = None


@dataclass
class ANPResult:
    """Learned masks per group key (float64 in [0, 1]), the iterations run, the loss
    (``alpha * natural + (1 - alpha) * robust``) at the first and the last iteration, the curve (block means of
    the loss and its two terms) and why the optimisation stopped (``converged`` or ``max iterations``)."""

    masks: dict[str, np.ndarray]
    iterations: int
    loss_first: float
    loss_last: float
    seconds: float
    curve: list[dict[str, float]] = field(default_factory=list)
    stopped: str = "max iterations"


def converged(losses: Sequence[float], window: int, tol: float) -> bool:
    """The stopping rule: at a multiple of ``window`` iterations (two windows at least), the mean loss of the
    last window is less than ``tol`` (relative) below the mean of the window before it."""
    n = len(losses)
    if window < 1 or n < 2 * window or n % window:
        return False
    cur = float(np.mean(losses[n - window :]))
    prev = float(np.mean(losses[n - 2 * window : n - window]))
    if not (math.isfinite(cur) and math.isfinite(prev)):
        return False
    return prev - cur < tol * max(abs(prev), 1e-12)


def _curve(it: list[float], nat: list[float], rob: list[float], points: int = 100) -> list[dict[str, float]]:
    block = max(1, math.ceil(len(it) / points))
    out = []
    for s in range(0, len(it), block):
        e = min(len(it), s + block)
        out.append({"iteration": e, "loss": float(np.mean(it[s:e])), "natural": float(np.mean(nat[s:e])),
                    "robust": float(np.mean(rob[s:e]))})  # fmt: skip
    return out


def _targets(module: nn.Module, groups: Sequence[NeuronGroup]) -> list[tuple[str, int, str | None]]:
    """(scale parameter name, axis, shift parameter name or None) in ``module.named_parameters()`` of the
    parameters each group's mask and perturbation act on."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    out = []
    for g in groups:
        if g.tap is not None:
            bn = module.taps_by_name()[g.tap]  # type: ignore[operator]
            out.append((by_id[id(bn.weight)], 0, by_id[id(bn.bias)]))
        else:
            p = module.param_for  # type: ignore[attr-defined]
            out.append((by_id[id(p(g.scale))], g.axis, by_id[id(p(g.shift))] if g.shift else None))
    return out


def logits(out: Any) -> torch.Tensor:
    y = out[0] if isinstance(out, tuple) else out
    return y.reshape(y.shape[0], -1)


def anp_masks(
    module: nn.Module,
    groups: Sequence[NeuronGroup],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float = EPS,
    alpha: float = ALPHA,
    lr: float = LR,
    momentum: float = MOMENTUM,
    iterations: int = ITERATIONS,
    batch_size: int = BATCH,
    window: int = WINDOW,
    tol: float = TOL,
    bn_train: bool = False,
    seed: int = 0,
    progress: Callable[[int, float, float], None] | None = None,
) -> ANPResult:
    """Optimise ANP's neuron masks (Wu & Wang, NeurIPS 2021, section 4, Algorithm 1) on clean ``images``
    (already in the model's input range and layout, on the module's device) and integer ``labels``.

    ``module`` is an :class:`~onnxclp.bridge.OnnxModule` (or any module with ``param_for(initializer_name)``
    and, for groups with a ``tap``, ``taps_by_name()``); its parameters are not modified (their
    ``requires_grad`` flags are restored). The graph runs in eval mode; ``bn_train``: the re-inserted
    BatchNorms of the groups with a ``tap`` normalise with each batch's statistics (train mode, as the
    reference implementation runs its BatchNorms; running statistics left as they are). ``eps = 0`` drops the
    adversarial term. Stops at :func:`converged` (``window``, ``tol``; ``tol < 0`` never) or after
    ``iterations``. ``progress(iteration, loss, seconds)`` is called after every iteration. Deterministic for a
    given ``seed`` on the CPU.
    """
    if not groups:
        raise ValueError("no neuron groups to mask")
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be in [0, 1]")
    if eps < 0 or iterations < 1 or batch_size < 1 or window < 1:
        raise ValueError("eps must be >= 0, iterations, batch_size and window >= 1")
    n = int(images.shape[0])
    if n == 0 or int(labels.shape[0]) != n:
        raise ValueError("images and labels must be non-empty and of one length")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    dev = images.device
    targets = _targets(module, groups)
    params = dict(module.named_parameters())
    base = {name: params[name].detach() for t in targets for name in (t[0], t[2]) if name}
    dtype = base[targets[0][0]].dtype
    masks = [torch.ones(g.channels, dtype=dtype, device=dev, requires_grad=True) for g in groups]
    opt = torch.optim.SGD(masks, lr=lr, momentum=momentum)

    def overrides(mult: Sequence[torch.Tensor], shift_mult: Sequence[torch.Tensor] | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, (g, (scale, axis, shift)) in enumerate(zip(groups, targets, strict=True)):
            w = base[scale]
            shape = [1] * w.dim()
            shape[axis] = g.channels
            out[scale] = w * mult[i].reshape(shape)
            if shift and shift_mult is not None:
                b = base[shift]
                out[shift] = b * shift_mult[i].reshape(b.shape)
        return out

    def loss_of(x: torch.Tensor, y: torch.Tensor, over: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(module, over, (x,), strict=False)
        return nn.functional.cross_entropy(logits(out), y)

    def uniform(c: int) -> torch.Tensor:
        return ((torch.rand(c, generator=gen, dtype=dtype) * 2 - 1) * eps).to(dev)

    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    was_training = module.training
    taps = [module.taps_by_name()[g.tap] for g in groups if g.tap is not None]  # type: ignore[operator]
    momenta = [getattr(t, "momentum", None) for t in taps]
    module.requires_grad_(False)
    module.eval()
    if bn_train:
        for t in taps:
            t.train()
            t.momentum = 0.0  # batch statistics, running statistics unchanged
    losses: list[float] = []
    nats: list[float] = []
    robs: list[float] = []
    stopped = "max iterations"
    order = torch.randperm(n, generator=gen)
    pos = 0
    try:
        for it in range(1, iterations + 1):
            if pos + min(batch_size, n) > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch_size]
            pos += len(idx)
            x, y = images[idx.to(dev)], labels[idx.to(dev)]
            m_now = [m.detach() for m in masks]
            if eps > 0:
                delta = [uniform(g.channels) for g in groups]
                xi = [uniform(g.channels) for g in groups]
                for t in delta + xi:
                    t.requires_grad_(True)
                rob = loss_of(x, y, overrides([m + d for m, d in zip(m_now, delta, strict=True)], [1 + e for e in xi]))
                grads = torch.autograd.grad(rob, delta + xi, allow_unused=True)
                with torch.no_grad():
                    k = len(groups)
                    step = [torch.zeros((), device=dev) if gr is None else eps * gr.sign() for gr in grads]
                    delta = [(d + s).clamp(-eps, eps) for d, s in zip(delta, step[:k], strict=True)]
                    xi = [(e + s).clamp(-eps, eps) for e, s in zip(xi, step[k:], strict=True)]
            opt.zero_grad()
            nat = loss_of(x, y, overrides(masks, None))
            loss = alpha * nat
            rob_value = 0.0
            if eps > 0:
                rob = loss_of(x, y, overrides([m + d for m, d in zip(masks, delta, strict=True)], [1 + e for e in xi]))
                loss = loss + (1 - alpha) * rob
                rob_value = float(rob.detach())
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            nats.append(float(nat.detach()))
            robs.append(rob_value)
            if progress is not None:
                progress(it, losses[-1], time.perf_counter() - t0)
            if tol >= 0 and converged(losses, window, tol):
                stopped = "converged"
                break
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(flags[name])
        for t, mom in zip(taps, momenta, strict=True):
            if hasattr(t, "momentum"):
                t.momentum = mom
        module.train(was_training)
    return ANPResult(
        masks={g.key: m.detach().to("cpu", torch.float64).numpy().copy() for g, m in zip(groups, masks, strict=True)},
        iterations=len(losses),
        loss_first=losses[0],
        loss_last=losses[-1],
        seconds=time.perf_counter() - t0,
        curve=_curve(losses, nats, robs),
        stopped=stopped,
    )


def batchnorm_after(module: nn.Module, tensors: Sequence[str], images: torch.Tensor, batch: int = 128) -> list[str]:
    """Put a BatchNorm (:func:`onnxclp.defences.repair.batchnorm_after`, the identity in eval mode) after each of
    ``tensors`` of the bridged ``module``, its statistics measured on ``images``; returns the tensors tapped."""
    from onnxclp.defences import repair

    return list(repair.batchnorm_after(module, list(tensors), images, batch))  # type: ignore[arg-type]


def prune_by_threshold(mask: np.ndarray, threshold: float = THRESHOLD) -> list[int]:
    """ANP's pruning by threshold (section 4.1): the neurons whose mask is strictly below ``threshold``."""
    return np.flatnonzero(np.asarray(mask, dtype=np.float64) < threshold).tolist()


def ranked(masks: dict[str, np.ndarray], keys: Sequence[str]) -> list[tuple[str, int]]:
    """Every neuron as (group key, channel), lowest mask first (ties: in the order of ``keys``, then channel)."""
    items = [(float(v), i, c, k) for i, k in enumerate(keys) for c, v in enumerate(np.asarray(masks[k]).tolist())]
    items.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(k, c) for _, _, c, k in items]


def count_grid(limit: int) -> list[int]:
    """Candidate numbers of pruned neurons, weakest first: 0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, ... (a factor
    of about sqrt 2), ending at ``limit``."""
    out = [0]
    c = 1.0
    while round(c) < limit:
        if round(c) > out[-1]:
            out.append(round(c))
        c *= math.sqrt(2.0)
    if limit > 0:
        out.append(limit)
    return out


def split_prune(order: Sequence[tuple[str, int]], count: int) -> dict[str, list[int]]:
    """The first ``count`` neurons of ``order`` per group key, channels sorted."""
    out: dict[str, list[int]] = {}
    for k, c in order[:count]:
        out.setdefault(k, []).append(c)
    return {k: sorted(v) for k, v in out.items()}


@torch.no_grad()
def pruned_right(module: nn.Module, groups: Sequence[NeuronGroup], prune: dict[str, list[int]], x: torch.Tensor,
                 y: torch.Tensor, batch: int = 256) -> np.ndarray:  # fmt: skip
    """Per image of ``x``, whether ``module`` (eval mode) classifies it right with the ``prune`` neurons pruned
    as onnxclp's editor prunes them: their slice of ``scale`` and their ``shift`` set to 0 (exactly 0 before the
    activation). The groups' ``tap`` is ignored: call it with no re-inserted BatchNorm left on the module."""
    params = dict(module.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    over: dict[str, torch.Tensor] = {}
    for g in groups:
        chans = prune.get(g.key)
        if not chans:
            continue
        w = module.param_for(g.scale)  # type: ignore[operator]
        keep = torch.ones(g.channels, dtype=w.dtype, device=w.device)
        keep[torch.as_tensor(chans, device=w.device)] = 0
        shape = [1] * w.dim()
        shape[g.axis] = g.channels
        over[by_id[id(w)]] = w * keep.reshape(shape)
        if g.shift:
            b = module.param_for(g.shift)  # type: ignore[operator]
            over[by_id[id(b)]] = b * keep.reshape(b.shape)
    was = module.training
    module.eval()
    try:
        preds = [logits(torch.func.functional_call(module, over, (x[i : i + batch],), strict=False)).argmax(1)
                 for i in range(0, len(x), batch)]  # fmt: skip
    finally:
        module.train(was)
    return (torch.cat(preds) == y).cpu().numpy()


PAST = 10.0  # points over the budget at which the walk stops measuring larger counts


def choose_count(order: Sequence[tuple[str, int]], limit: int, measure: Callable[[int], np.ndarray],
                 right_before: np.ndarray, budget: float, sequence_z: float | None = None,
                 ) -> tuple[int, list[dict[str, Any]]]:  # fmt: skip
    """The number of lowest-mask neurons to prune, chosen on the validation images with a monotone reading.

    More pruning cannot be expected to cost less accuracy, but a drop measured on 100 validation images moves by
    a few points from one count to the next (measured on resnet-badnets: the first-over-budget walk stopped at 9
    neurons of the 48 that remove the backdoor). So: the drop is measured at every count of :func:`count_grid`
    up to ``limit`` (stopping once one is :data:`PAST` points over the budget), then by bisection between the
    last grid count within the budget and the next; a non-decreasing curve is fitted to all of them (isotonic
    regression, :func:`onnxclp.guard.isotonic`), and the count is the largest whose fitted drop is within
    ``budget`` and whose measured drop's one-sided upper bound (:meth:`onnxclp.guard.Drop.bound`, the selection
    margin every repair's choice has) is within it too; the bisection reads the same bound. ``measure(count)`` is
    the correctness per selection image with that many pruned. Returns the count and every trial (count,
    accuracy, drop, bound, within, fitted) in the order measured.

    ``sequence_z`` given (no selection part: the counts are read on the guard's validation part): the grid's
    counts are tested in fixed sequence, smallest first, each accepted when its drop's one-sided bound at
    ``sequence_z`` standard errors is within ``budget``; the count is the last accepted before the first refused
    (0 when the first is), with no bisection and no fitted curve (docs/algorithms.md, "Testing candidates in
    sequence")."""
    from onnxclp.guard import isotonic, paired_drop

    trials: list[dict[str, Any]] = []
    if sequence_z is not None:
        count = 0
        for c in count_grid(max(0, min(limit, len(order)))):
            d = paired_drop(right_before, measure(c))
            ok = d.bound(sequence_z) <= budget + 1e-9
            trials.append({"count": c, "acc": d.acc_after, "drop": d.drop, "bound": d.bound(sequence_z),
                           "within": ok, "in_sequence": True})  # fmt: skip
            if not ok:
                break
            count = c
        return count, trials

    def trial(count: int) -> float:
        d = paired_drop(right_before, measure(count))
        trials.append({"count": count, "acc": d.acc_after, "drop": d.drop, "bound": d.bound(),
                       "within": d.bound() <= budget + 1e-9})  # fmt: skip
        return d.drop

    grid = count_grid(max(0, min(limit, len(order))))
    for count in grid:
        if trial(count) > budget + PAST:
            break

    def fitted() -> dict[int, float]:
        pts = sorted({t["count"]: t["drop"] for t in trials}.items())
        return dict(zip([c for c, _ in pts], isotonic(np.array([d for _, d in pts])).tolist(), strict=True))

    def best_of(fit: dict[int, float]) -> int:
        within = {t["count"]: t["within"] for t in trials}
        ok = [c for c in fit if fit[c] <= budget + 1e-9 and within[c]]
        return max(ok) if ok else 0

    best = best_of(fitted())
    above = [c for c in grid if c > best and any(t["count"] == c for t in trials)]
    if above:  # refine between the chosen grid count and the next one measured
        lo, hi = best, above[0]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial(mid)
            lo, hi = (mid, hi) if trials[-1]["within"] else (lo, mid)
        best = best_of(fitted())
    fit = fitted()
    for t in trials:
        t["fitted"] = fit[t["count"]]
    return best, trials
