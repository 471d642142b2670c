"""Selection rules: scores in, channel index sets out. Pure numpy, no graph.

- :func:`select_clp`: CLP (Zheng et al., ECCV 2022, section 4.5, Algorithm 1): flag ``score > mean + u * std``.
- :func:`select_lpp`: LPP (docs/algorithms.md, "LPP", onnxclp's reading of the paper's section 3.3): prune both
  tails, rescale the band just below the upper threshold by ``mean / score``.
- :func:`classifier_topk`: LPP's step on the classifier layer: zero the ``k`` weights that most separate the
  suspected target class from the others.

The standard deviation uses ddof = 1, as the public CLP code does (``torch.std`` is unbiased); the CLP paper's
formula divides by K. With a single channel the std is undefined and nothing is selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Thresholds:
    """The statistics behind a layer's decisions (None where a rule does not apply)."""

    mean: float
    std: float
    upper: float | None = None
    lower: float | None = None
    rescale_from: float | None = None


@dataclass
class Selection:
    """Decisions for one layer: channels to prune, channels to rescale with their factors."""

    prune: list[int] = field(default_factory=list)
    rescale: dict[int, float] = field(default_factory=dict)
    thresholds: Thresholds | None = None


def _stats(scores: np.ndarray) -> tuple[float, float] | None:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size < 2 or not np.all(np.isfinite(s)):
        return None
    return float(s.mean()), float(s.std(ddof=1))


def select_clp(scores: np.ndarray, u: float) -> Selection:
    """CLP: channels whose score is strictly above ``mean + u * std`` (one-sided)."""
    st = _stats(scores)
    if st is None:
        return Selection()
    mean, std = st
    upper = mean + u * std
    prune = np.flatnonzero(np.asarray(scores, dtype=np.float64) > upper).tolist()
    return Selection(prune=prune, thresholds=Thresholds(mean, std, upper=upper))


def select_lpp(scores: np.ndarray, u: float, u_low: float, bias_rate: float) -> Selection:
    """LPP: prune ``score > mean + u*s`` and ``score < mean + u_low*s``; rescale the band
    ``mean + (u - bias_rate)*s < score <= mean + u*s`` by ``mean / score`` (docs/algorithms.md, "LPP").

    A channel both in the band and below the lower threshold (possible only when ``u - bias_rate <
    u_low``) is pruned. A rescale factor is never above 1 for a positive mean.
    """
    st = _stats(scores)
    if st is None:
        return Selection()
    mean, std = st
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    upper = mean + u * std
    lower = mean + u_low * std
    band_lo = mean + (u - bias_rate) * std
    pruned = (x > upper) | (x < lower)
    band = (x > band_lo) & (x <= upper) & ~pruned & (x > 0)
    rescale = {int(i): float(mean / x[i]) for i in np.flatnonzero(band)}
    return Selection(
        prune=np.flatnonzero(pruned).tolist(),
        rescale=rescale,
        thresholds=Thresholds(mean, std, upper=upper, lower=lower, rescale_from=band_lo),
    )


@dataclass
class TopK:
    """The classifier step's result: the suspected target class and the input columns zeroed in its row."""

    target: int
    columns: list[int]


def classifier_topk(w: np.ndarray, k: int, target: int | None = None) -> TopK | None:
    """LPP's classifier step on ``w`` of shape (classes, inputs) (docs/algorithms.md, "LPP", classifier top-k step).

    ``m = argmax_i mean(W[i, :])``; ``d = W[m, :] - mean_{i != m} W[i, :]``; the ``k`` largest ``d_j`` are
    zeroed in row ``m``. Ties are broken by the lower index (a stable sort), so the result is deterministic.
    """
    w = np.asarray(w, dtype=np.float64)
    if k <= 0 or w.ndim != 2 or w.shape[0] < 2:
        return None
    m = int(np.argmax(w.mean(axis=1))) if target is None else int(target)
    if not 0 <= m < w.shape[0]:
        return None
    others = np.delete(w, m, axis=0).mean(axis=0)
    d = w[m] - others
    order = np.argsort(-d, kind="stable")[: min(k, w.shape[1])]
    return TopK(target=m, columns=sorted(int(j) for j in order))
