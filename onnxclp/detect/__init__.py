"""Model-level backdoor detectors: one module each, registered like the methods (docs/detect.md).

A detector turns a scanned model (the pipeline's :class:`~onnxclp.pipeline.State`: scores, layers, weights) into
one statistic and a p-value under its null hypothesis "no backdoor", plus the suspected target class where it
yields one. :func:`verdict` combines the detectors that ran: the model is ``suspicious`` when the smallest p-value,
Bonferroni-corrected for the number of detectors, is below the false-positive rate ``fpr``; ``unverified`` when no
detector could examine it (each one's reason is kept: the gate fails closed, never calls it ``clean``). The p-values are
computed within the model (no clean reference model is needed at scan time); how well they hold on real clean
models is measured in docs/detect.md (bench/detect_roc.py).
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
    threshold: float | None = None  # the p-value threshold applied (fpr / number of detectors)
    suspicious: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("statistic", "p_value", "threshold"):
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


def verdict(results: dict[str, DetectorResult], fpr: float) -> tuple[str, int | None]:
    """``suspicious`` when a detector's p-value is below ``fpr / len(results)`` (Bonferroni), else ``clean``;
    ``unverified`` when no detector ran (none could examine the model: fail closed). The target class of the most
    significant suspicious detector. Marks each result with its threshold."""
    if not results:
        return "unverified", None
    threshold = fpr / len(results)
    best: tuple[float, int | None] | None = None
    for r in results.values():
        r.threshold = threshold
        r.suspicious = r.p_value is not None and r.p_value < threshold
        if r.suspicious and (best is None or (r.p_value or 0.0) < best[0]):
            best = (r.p_value or 0.0, r.target)
    return ("suspicious", best[1]) if best is not None else ("clean", None)


def max_normal_p(z: float, k: int) -> float:
    """P(the largest of ``k`` independent standard normals exceeds ``z``) = 1 - Phi(z)^k (Sidak)."""
    tail = 0.5 * math.erfc(z / math.sqrt(2.0))  # 1 - Phi(z), accurate in the far tail
    if tail < 1e-12:
        return min(1.0, k * tail)
    return 1.0 - (1.0 - tail) ** k
