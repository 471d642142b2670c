"""Model-level backdoor detectors: one module each, registered like the methods (docs/detect.md).

A detector turns a scanned model (the pipeline's :class:`~onnxclp.pipeline.State`: scores, layers, weights) into
one statistic and a p-value under its null hypothesis "no backdoor", plus the suspected target class where it
yields one. :func:`verdict` combines the detectors that ran (:mod:`onnxclp.detect._null`): each p-value is
recalibrated on clean models, and the model is ``suspicious`` when the smallest calibrated p-value, Sidak-corrected
for the number of detectors that examined it, is below the false-positive rate ``fpr``; ``unverified`` when no
detector could examine it (each one's reason is kept: the gate fails closed, never calls it ``clean``). No
reference model is needed at scan time: the calibration constants ship with the package, and the false-positive
rate they give is measured on held-out clean models in docs/results-detect.md (bench/detect_roc.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from onnxclp.registry import Registry

if TYPE_CHECKING:
    from onnxclp.pipeline import State

__all__ = ["Detector", "DetectorResult", "default_names", "get", "names", "register", "run_detectors", "verdict"]


@dataclass
class DetectorResult:
    """One detector's finding on one model."""

    statistic: float
    p_value: float | None
    target: int | None = None
    detail: str = ""
    threshold: float | None = None  # the threshold applied to p_calibrated (Sidak over the detectors that ran)
    suspicious: bool = False
    p_calibrated: float | None = None  # p_value recalibrated on clean models (onnxclp.detect._null)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("statistic", "p_value", "threshold", "p_calibrated"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d


class Detector:
    """Base class of a registered detector."""

    name: ClassVar[str]
    description: ClassVar[str]
    default: ClassVar[bool] = True  # run by ``scan`` unless ``--detector`` names others
    extra: ClassVar[str | None] = None  # optional extra it imports (None: numpy only)

    def run(self, state: State) -> DetectorResult | str:
        """The finding, or a string: why the detector does not apply to this model."""
        raise NotImplementedError


_REGISTRY: Registry[Detector] = Registry("detector", __name__, __path__)
register = _REGISTRY.register
names = _REGISTRY.names


def default_names() -> list[str]:
    """The detectors ``scan`` runs unless ``--detector`` names others."""
    return [n for n in names() if _REGISTRY.classes()[n].default]


def get(name: str) -> Detector:
    """The registered detector ``name``; an unknown name is a usage error."""
    return _REGISTRY.get(name)


def run_detectors(
    state: State, chosen: tuple[str, ...] | list[str] = ()
) -> tuple[dict[str, DetectorResult], dict[str, str]]:
    """Run the chosen detectors (default: :func:`default_names`); returns results and the reasons of those that
    did not apply. A detector that fails (raises) did not apply either: its reason says how it failed."""
    from onnxclp.errors import OnnxclpError

    results: dict[str, DetectorResult] = {}
    skipped: dict[str, str] = {}
    for n in chosen or default_names():
        try:
            out = get(n).run(state)
        except OnnxclpError as exc:
            out = f"failed: {exc.message}"
        except MemoryError:
            out = "failed: out of memory"
        except Exception as exc:  # a bug or an unexpected model: this detector says nothing, the others still run
            out = f"failed: {type(exc).__name__}: {exc}"
        if isinstance(out, str):
            skipped[n] = out
        else:
            results[n] = out
    return results, skipped


def verdict(results: dict[str, DetectorResult], fpr: float) -> tuple[str, int | None, float | None]:
    """(verdict, target, the model's p-value). Each result's p-value is recalibrated on clean models
    (:func:`onnxclp.detect._null.calibrate`) and the smallest of the ``m`` is Sidak-corrected,
    ``p_model = 1 - (1 - min p_cal)^m``: ``suspicious`` when ``p_model < fpr``, else ``clean``; ``unverified`` (no
    p-value) when no detector ran (none could examine the model: fail closed). The target class of the most
    significant suspicious detector that names one. Marks each result with its calibrated p-value and threshold."""
    from onnxclp.detect import _null

    if not results:
        return "unverified", None, None
    threshold = _null.threshold(fpr, len(results))
    calibrated = []
    for name, r in results.items():
        r.p_calibrated = None if r.p_value is None else _null.calibrate(name, r.p_value)
        r.threshold = threshold
        r.suspicious = r.p_calibrated is not None and r.p_calibrated < threshold
        calibrated.append(1.0 if r.p_calibrated is None else r.p_calibrated)
    p_model = _null.combine(calibrated)
    named = [r for r in results.values() if r.suspicious and r.target is not None]
    target = min(named, key=lambda r: r.p_calibrated or 0.0).target if named else None
    return ("suspicious" if p_model < fpr else "clean"), target, p_model


def max_normal_p(z: float, k: int) -> float:
    """P(the largest of ``k`` independent standard normals exceeds ``z``) = 1 - Phi(z)^k (Sidak)."""
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))  # 1 - Phi(z), accurate in the far tail
    if tail < 1e-12:
        return min(1.0, k * tail)
    return 1.0 - (1.0 - tail) ** k
