"""Calibrating u on a few hundred clean images (beyond both papers, which are data-free).

The papers fix u (CLP: 3 on CIFAR-10, 5 on Tiny-ImageNet) because a defender is assumed to have no data. A user
who does have some clean images can afford to measure: :func:`calibrate` tries the candidate u from the largest
(least pruning) down and keeps the smallest u whose clean-accuracy drop stays within the budget.

The rule, exactly: candidates are taken in decreasing order; the walk stops at the first candidate whose drop
exceeds ``max_acc_drop`` (in percentage points of accuracy on the calibration set); the chosen u is the last
candidate before it. So the chosen u and every larger candidate are within budget: a lucky small u beyond a
failing one is never picked (accuracy is not exactly monotone in u on a small set). When even the largest
candidate breaks the budget, nothing is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

PathLike = str | os.PathLike[str]

__all__ = ["DEFAULT_GRID", "Calibration", "calibrate", "choose_u"]

DEFAULT_GRID = "0.5:8:0.25"


@dataclass
class Calibration:
    """The u chosen (None when no candidate is within budget) and every candidate tried, largest first."""

    u: float | None
    method: str
    max_acc_drop: float
    acc_before: float
    acc_after: float | None
    n_samples: int
    tried: list[dict[str, Any]] = field(default_factory=list)  # {"u", "acc", "drop", "pruned", "within"}

    @property
    def drop(self) -> float | None:
        """Accuracy drop of the chosen u, in percentage points."""
        return None if self.acc_after is None else 100 * (self.acc_before - self.acc_after)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop": self.drop}


def choose_u(accs: Mapping[float, float], acc_before: float, max_acc_drop: float) -> float | None:
    """The rule of the module docstring on measured accuracies ``{u: acc}`` (accuracies as fractions)."""
    chosen = None
    for u in sorted(accs, reverse=True):
        if 100 * (acc_before - accs[u]) > max_acc_drop + 1e-9:
            break
        chosen = u
    return chosen


def calibrate(
    model: onnx.ModelProto | PathLike,
    prepared: Any,
    method: str = "clp",
    max_acc_drop: float = 1.0,
    grid: Sequence[float] | None = None,
    **fixed: Any,
) -> Calibration:
    """Choose u for ``method`` on the clean images of ``prepared`` (:func:`onnxclp.study.measure.prepare`).

    ``fixed``: the other keyword arguments of ``onnxclp.sanitize`` (u_low, bias_rate, topk, score...). Candidates
    are measured from the largest u down and the walk stops at the first one over budget.
    """
    from onnxclp.api import sanitize
    from onnxclp.errors import OnnxclpError
    from onnxclp.study.measure import load_inline, measure
    from onnxclp.study.sweep import parse_grid

    if max_acc_drop < 0:
        raise OnnxclpError(f"--max-acc-drop must be >= 0, got {max_acc_drop}")
    candidates = sorted(set(parse_grid(DEFAULT_GRID) if grid is None else [float(u) for u in grid]), reverse=True)
    if not candidates:
        raise OnnxclpError("calibration needs at least one candidate u")
    proto = model if isinstance(model, onnx.ModelProto) else load_inline(model)
    before = measure(proto, prepared).acc
    if before is None:
        raise OnnxclpError("calibration data has no images")
    result = Calibration(None, method, float(max_acc_drop), before, None, prepared.n_samples)
    accs: dict[float, float] = {}
    for u in candidates:
        sanitized, report = sanitize(proto, method, u, **{"force": True, **fixed})  # measured: risky u allowed
        acc = measure(sanitized, prepared).acc
        assert acc is not None
        accs[u] = acc
        drop = 100 * (before - acc)
        within = drop <= max_acc_drop + 1e-9
        result.tried.append({"u": u, "acc": acc, "drop": drop, "pruned": report.pruned_channels, "within": within})
        if not within:
            break
    result.u = choose_u(accs, before, max_acc_drop)
    if result.u is not None:
        result.acc_after = accs[result.u]
    return result
