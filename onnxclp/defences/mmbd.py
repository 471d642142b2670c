"""MM-BD: data-free backdoor detection by the maximum achievable logit margin per class.

Wang, Xiang, Miller, Kesidis, "MM-BD: Post-Training Detection of Backdoor Attacks with Arbitrary Backdoor
Pattern Types Using a Maximum Margin Statistic", IEEE S&P 2024 (arXiv:2205.06900).

What the paper does (section III, "Detection"): for each class c, estimate the maximum achievable margin
``r_c = max_x [f_c(x) - max_{k != c} f_k(x)]`` over the valid input domain by gradient ascent from random
starting images, keeping the best over the starts. A backdoor target class has an abnormally large ``r_c``,
whatever the trigger's embedding, because the trigger is a shortcut to a large target logit. Detection
inference: the largest statistic is tested against a null density fitted to the other K-1 statistics (a Gamma
distribution in the authors' code); the order-statistic p-value ``1 - H(r_max)^K`` below 0.05 flags the
model, and the argmax class is the detected target.

Where onnxclp's reading differs (to be repeated in docs/algorithms.md):
- The search runs projected Adam (the image is clamped to [lo, hi] after each step) instead of the public
  code's plain SGD (lr 0.01, 300 steps, 30 starts) on ``clamp(x)``, where a pixel pushed out of range gets
  no gradient and stays stuck. Adam is scale-free, so the same step size works for every model's logit scale.
- Fewer steps and starts by default, chosen by the rule in :func:`mmbd`'s docstring (CPU budget); an early
  stop ends the search when no margin improves any more.
- The Gamma null is fitted as in the public code (three parameters by maximum likelihood); when that fit
  fails or degenerates (nine points can make it so), a method-of-moments fit is used and reported.
- Inputs: images in [lo, hi] (default [0, 1]) mapped through the caller's per-channel ``(x - mean) / std``,
  since the exported model takes normalised images.

Measured here (not in the paper): the null fitted without the largest statistic underestimates the upper
tail. On 10 i.i.d. Gamma(4, 0.5) + 1 "margins" (no outlier at all), ``p < 0.05`` in 31 % of 300 draws with the
maximum-likelihood fit (20 % with a moments fit), so the 0.05 threshold is not a 5 % false-positive rate with
K = 10. Callers should calibrate the threshold on clean models (the zoo's clean seeds) or require a large
margin ratio as well; :attr:`MMBDResult.margins` carries what that needs.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from onnxclp.defences._inputs import SyntheticInput, to_model

# Defaults (rule in mmbd's docstring, written down before any measurement).
STEPS = 60
RESTARTS = 4
LR = 0.05  # per step, as a fraction of (hi - lo)
ALPHA = 0.05  # the paper's detection threshold on the p-value


@dataclass(frozen=True)
class MMBDResult:
    """MM-BD's statistics and decision for one model.

    ``margins[c]``: the largest margin found for class c. ``statistic``: the largest margin (that of
    ``target``). ``p_value``: the order-statistic p-value of ``statistic`` under the Gamma null fitted to the
    other margins; ``backdoored`` is ``p_value < alpha``. ``null``: the null's (shape, loc, scale) and
    ``null_fit`` how it was fitted ("mle", "moments", or "degenerate" when the other margins are all equal).
    """

    margins: np.ndarray
    statistic: float
    p_value: float
    target: int
    backdoored: bool
    alpha: float
    null: tuple[float, float, float]
    null_fit: str
    steps_run: int
    restarts: int
    time_s: float

    def to_dict(self) -> dict:
        """JSON-ready form (for reports)."""
        return {
            "margins": [float(m) for m in self.margins],
            "statistic": self.statistic,
            "p_value": self.p_value,
            "target": self.target,
            "backdoored": self.backdoored,
            "alpha": self.alpha,
            "null": list(self.null),
            "null_fit": self.null_fit,
            "steps_run": self.steps_run,
            "restarts": self.restarts,
            "time_s": self.time_s,
        }


def gamma_null_pvalue(margins: Sequence[float]) -> tuple[float, int, tuple[float, float, float], str]:
    """(p-value, target, (shape, loc, scale), fit) of MM-BD's detection inference on per-class margins.

    The null is a Gamma density fitted to every margin but the largest; the p-value is the probability that
    the largest of K draws from it is at least the observed maximum, ``1 - H(r_max)^K``.
    """
    from scipy import stats

    r = np.asarray(margins, dtype=np.float64)
    if r.ndim != 1 or r.size < 3 or not np.all(np.isfinite(r)):
        raise ValueError("MM-BD needs at least 3 finite per-class margins")
    k = r.size
    target = int(np.argmax(r))
    r_max = float(r[target])
    null = np.delete(r, target)
    spread = float(null.std())
    if spread <= 1e-9 * max(1.0, float(np.abs(null).max())):
        return (0.0 if r_max > float(null.max()) else 1.0), target, (math.nan, math.nan, math.nan), "degenerate"
    fit = "mle"
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            shape, loc, scale = (float(v) for v in stats.gamma.fit(null))
    except Exception:  # scipy's optimiser can fail on a handful of points
        shape = loc = scale = math.nan
    ok = all(math.isfinite(v) for v in (shape, loc, scale)) and shape > 0 and scale > 0 and loc < float(null.min())
    if not ok:
        fit = "moments"
        loc = float(null.min()) - spread
        m, v = float(null.mean()) - loc, float(null.var(ddof=1))
        shape, scale = m * m / v, v / m
    cdf = float(stats.gamma.cdf(r_max, shape, loc=loc, scale=scale))
    p = 1.0 if cdf <= 0.0 else float(-math.expm1(k * math.log(cdf)))
    p = 0.0 if not p > 0.0 else min(p, 1.0)  # (also turns -0.0 into 0.0)
    return p, target, (shape, loc, scale), fit


def _search(
    module: torch.nn.Module,
    labels: torch.Tensor,
    x: torch.Tensor,
    lo: float,
    hi: float,
    norm: tuple[torch.Tensor, torch.Tensor] | None,
    steps: int,
    lr: float,
    patience: int,
) -> tuple[torch.Tensor, int]:
    """Best margin per image of one chunk (projected Adam on the image), and the steps run."""
    x = x.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr * (hi - lo))
    best = torch.full((x.shape[0],), -math.inf, device=x.device)
    onehot: torch.Tensor | None = None
    stale, run = 0, 0
    for step in range(steps + 1):
        logits = module(to_model(x, norm))
        if isinstance(logits, torch.Tensor) and logits.dim() > 2 and all(d == 1 for d in logits.shape[2:]):
            logits = logits.flatten(1)  # N x K x 1 x 1 (a 1x1-convolution classifier after global pooling)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError("MM-BD needs a model whose (first) output is a 2-D logit matrix")
        if onehot is None or onehot.shape != logits.shape:
            onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).bool()
        own = logits[onehot]
        other = logits.masked_fill(onehot, -math.inf).amax(dim=1)
        margin = own - other
        with torch.no_grad():
            m = margin.detach()
            improved = ~torch.isfinite(best) | (m > best + 1e-4 * best.abs().clamp(min=1.0))
            best = torch.maximum(best, m)
        stale = 0 if bool(improved.any()) else stale + 1
        if step == steps or stale >= patience:
            break
        run += 1
        opt.zero_grad(set_to_none=True)
        (-margin.sum()).backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return best, run


def classes_of(module: torch.nn.Module, inputs: SyntheticInput | tuple[int, ...]) -> int:
    """The width of ``module``'s logits (``N x K`` or ``N x K x 1 x 1``) on one mid-range image of ``inputs``
    (eval mode is the caller's; no gradients)."""
    inputs = SyntheticInput.of(inputs)
    dev = torch.device(inputs.device)
    with torch.no_grad():
        x = torch.full((1, *inputs.shape), (inputs.lo + inputs.hi) / 2, device=dev)
        probe = module(to_model(x, inputs.normaliser(dev)))
    if probe.dim() > 2 and all(d == 1 for d in probe.shape[2:]):
        probe = probe.flatten(1)
    return int(probe.shape[-1])


def mmbd(
    module: torch.nn.Module,
    inputs: SyntheticInput | Sequence[int],
    *,
    num_classes: int | None = None,
    steps: int = STEPS,
    restarts: int = RESTARTS,
    lr: float = LR,
    patience: int = 10,
    batch_size: int = 64,
    alpha: float = ALPHA,
    seed: int = 0,
) -> MMBDResult:
    """MM-BD (Wang et al., IEEE S&P 2024, section III): per-class maximum margins, Gamma-null p-value, target.

    ``inputs`` (a :class:`~onnxclp.defences._inputs.SyntheticInput`, or one image's shape without the batch
    dimension, ``input_spec(model)[0][1:]``, for the defaults) says where the images are searched (``[lo, hi]``)
    and how they are fed to the model (normalisation, channel axis, device). ``num_classes`` defaults to the
    width of the logits.
    The module is used in eval mode and never modified (its parameters get no gradient).

    Default budget rule (written before measuring): the search costs K * restarts * (steps + 1) forward and
    backward passes of one image. A 2-core CPU is estimated at 50-100 such passes per second on a CIFAR
    ResNet-18 at half width (about 0.14 GFLOP forward, three times that with the backward pass, at 20-40
    effective GFLOP/s); the 60 s target then allows about 3,000 passes for K = 10. Hence 4 starts x 60 steps
    (2,440 passes for K = 10), with Adam at 5 % of the range per step so that a start can cross the whole
    range within the budget, and an early stop after 10 steps without a margin improving by 1e-4 (relative).
    The cost grows linearly with K; pass fewer steps for many classes or a larger network.
    """
    inputs = SyntheticInput.of(inputs)
    input_shape, lo, hi = inputs.shape, inputs.lo, inputs.hi
    if steps < 0 or restarts < 1 or not hi > lo:
        raise ValueError("MM-BD needs steps >= 0, restarts >= 1 and hi > lo")
    t0 = time.perf_counter()
    was_training = module.training
    module.eval()
    grads = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        dev = torch.device(inputs.device)
        norm = inputs.normaliser(dev)
        gen = torch.Generator().manual_seed(seed)
        if num_classes is None:
            num_classes = classes_of(module, inputs)
        labels = torch.arange(num_classes).repeat_interleave(restarts)
        starts = lo + (hi - lo) * torch.rand((labels.numel(), *input_shape), generator=gen)
        best = torch.empty(labels.numel())
        steps_run = 0
        for i in range(0, labels.numel(), batch_size):
            b, n = _search(
                module, labels[i : i + batch_size].to(dev), starts[i : i + batch_size].to(dev),
                lo, hi, norm, steps, lr, patience,
            )  # fmt: skip
            best[i : i + batch_size] = b.detach().cpu()
            steps_run = max(steps_run, n)
    finally:
        for p, g in zip(module.parameters(), grads, strict=True):
            p.requires_grad_(g)
        module.train(was_training)
    margins = best.reshape(num_classes, restarts).amax(dim=1).double().numpy()
    if margins.size < 3:  # no null to fit beside the largest: the margins and the ranking alone (the gates' suspects)
        p_value, target, fit = math.nan, int(np.argmax(margins)), "none: fewer than 3 classes"
        null = (math.nan, math.nan, math.nan)
    else:
        p_value, target, null, fit = gamma_null_pvalue(margins)
    return MMBDResult(
        margins=margins,
        statistic=float(margins[target]),
        p_value=p_value,
        target=target,
        backdoored=p_value < alpha,
        alpha=alpha,
        null=null,
        null_fit=fit,
        steps_run=steps_run,
        restarts=restarts,
        time_s=time.perf_counter() - t0,
    )
