"""ACC, ASR and the fraction of channels pruned against the threshold u (CLP paper, section 5.3 and Figure 4).

For each setting the model is sanitized in memory (``onnxclp.sanitize`` on a ModelProto) and measured on data
prepared once (:mod:`onnxclp.study.measure`). :func:`sweep` varies u; :func:`sweep_settings` takes any list of
parameter settings (used to choose LPP's defaults: u, u_low, bias rate, top-k).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from onnxclp.errors import NothingToSanitize, OnnxclpError

PathLike = str | os.PathLike[str]

__all__ = ["SweepPoint", "SweepResult", "parse_grid", "sweep", "sweep_settings"]


def parse_grid(text: str) -> list[float]:
    """``START:STOP:STEP`` (STOP included when on the grid) or a comma-separated list, e.g. ``0.5:8:0.5``, ``1,2,3``."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if step <= 0 or stop < start or not all(map(math.isfinite, parts)):
                raise OnnxclpError(f"grid {text!r}: need START <= STOP and STEP > 0")
            n = math.floor((stop - start) / step + 1e-9) + 1
            if n > 10_000:
                raise OnnxclpError(f"grid {text!r}: {n} values, too many")
            return [round(start + i * step, 10) for i in range(n)]
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise OnnxclpError(f"grid {text!r}: expected START:STOP:STEP or comma-separated numbers") from None
    if not values or not all(map(math.isfinite, values)):
        raise OnnxclpError(f"grid {text!r}: expected finite numbers")
    return values


@dataclass
class SweepPoint:
    """One setting and what it did: metrics, channels pruned/rescaled, sanitize time."""

    settings: dict[str, Any]
    acc: float | None
    asr: float | None
    ra: float | None
    pruned: int
    rescaled: int
    channels: int
    sanitize_s: float
    note: str | None = None

    @property
    def u(self) -> float | None:
        return self.settings.get("u")

    @property
    def pruned_fraction(self) -> float:
        return self.pruned / self.channels if self.channels else 0.0


@dataclass
class SweepResult:
    """The baseline (the model as given) and one :class:`SweepPoint` per setting."""

    model: str
    method: str
    fixed: dict[str, Any]
    data: str
    attack: dict[str, Any]
    n_samples: int
    n_attacked: int
    baseline_acc: float | None
    baseline_asr: float | None
    baseline_ra: float | None
    points: list[SweepPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p, src in zip(d["points"], self.points, strict=True):
            p["pruned_fraction"] = src.pruned_fraction
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self, keys: Sequence[str] | None = None) -> list[list[str]]:
        """Rows of text (header first): the varied settings, ACC, ASR, RA, pruned (and rescaled for LPP)."""
        from onnxclp import methods

        rescales = methods.get(self.method).rescales  # the method may rescale: a column for it
        keys = list(keys) if keys is not None else _varied(self.points)
        head = [*keys, "ACC %", "ASR %", "RA %", "pruned", "pruned %"]
        if rescales:
            head.append("rescaled")
        rows = [head]
        base = ["before"] + [""] * (len(keys) - 1) if keys else []
        rows.append([*base, _pct(self.baseline_acc), _pct(self.baseline_asr), _pct(self.baseline_ra), "0", "0.0"])
        if rescales:
            rows[-1].append("0")
        for p in self.points:
            row = [_fmt(p.settings.get(k)) for k in keys]
            row += [_pct(p.acc), _pct(p.asr), _pct(p.ra), str(p.pruned), f"{100 * p.pruned_fraction:.1f}"]
            if rescales:
                row.append(str(p.rescaled))
            rows.append(row)
        return rows


def _varied(points: Sequence[SweepPoint]) -> list[str]:
    keys: list[str] = []
    for p in points:
        for k in p.settings:
            if k not in keys and len({json.dumps(q.settings.get(k)) for q in points}) > 1:
                keys.append(k)
    return keys or (["u"] if points and "u" in points[0].settings else [])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return "-" if v is None else str(v)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def sweep_settings(
    model: onnx.ModelProto | PathLike,
    prepared: Any,
    settings: Iterable[Mapping[str, Any]],
    method: str = "clp",
    *,
    fixed: Mapping[str, Any] | None = None,
    baseline: Any = None,
    name: str | None = None,
) -> SweepResult:
    """Sanitize ``model`` in memory with each setting (keyword arguments of ``onnxclp.sanitize`` over ``fixed``)
    and measure it on ``prepared`` (:func:`onnxclp.study.measure.prepare`).

    ``baseline``: the model's own :class:`~onnxclp.study.measure.Metrics` when already measured. A setting that
    leaves nothing to prune still counts (the model is unchanged); an invalid one raises.
    """
    from onnxclp.api import sanitize
    from onnxclp.study.measure import load_inline, measure

    proto = model if isinstance(model, onnx.ModelProto) else load_inline(model)
    fixed = dict(fixed or {})
    base = baseline if baseline is not None else measure(proto, prepared)
    result = SweepResult(
        model=name or (str(model) if not isinstance(model, onnx.ModelProto) else "<in-memory model>"),
        method=method,
        fixed=fixed,
        data=prepared.data,
        attack=prepared.attack,
        n_samples=prepared.n_samples,
        n_attacked=prepared.n_attacked if prepared.has_attack else 0,
        baseline_acc=base.acc,
        baseline_asr=base.asr if prepared.has_attack else None,
        baseline_ra=base.ra if prepared.has_attack else None,
    )
    for setting in settings:
        kwargs = {**fixed, **setting}
        try:
            sanitized, report = sanitize(proto, method, force=True, **kwargs)  # measured: risky u allowed
        except NothingToSanitize as exc:
            raise OnnxclpError(f"nothing to sweep: {exc.message}") from exc
        m = measure(sanitized, prepared)
        result.points.append(
            SweepPoint(
                settings=dict(setting),
                acc=m.acc,
                asr=m.asr if prepared.has_attack else None,
                ra=m.ra if prepared.has_attack else None,
                pruned=report.pruned_channels,
                rescaled=report.rescaled_channels,
                channels=report.total_channels,
                sanitize_s=report.time_s,
            )
        )
    return result


def sweep(
    model: onnx.ModelProto | PathLike,
    prepared: Any,
    us: Sequence[float],
    method: str = "clp",
    **fixed: Any,
) -> SweepResult:
    """:func:`sweep_settings` over u (other parameters fixed: ``u_low``, ``bias_rate``, ``topk``, ``score``...)."""
    name = fixed.pop("name", None)
    baseline = fixed.pop("baseline", None)
    return sweep_settings(
        model, prepared, ({"u": float(u)} for u in us), method, fixed=fixed, baseline=baseline, name=name
    )
