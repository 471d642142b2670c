"""The detectors' nulls measured on clean models, and the combined verdict rule (docs/detect.md, "The verdict").

Each detector computes a p-value under its own within-model null (classes exchangeable, a Gamma fit to the other
classes' margins...). Those nulls are approximations: on clean trained models the p-values are not uniform. So
each p-value is first put on the normal scale, ``z = Phi^-1(1 - p)``, and recalibrated with the location and
scale that ``z`` has on clean models (``p`` clipped at :data:`_P_MIN` first), ``p_cal = 1 - Phi((z - mu) / sigma)`` (an "empirical null" in Efron's sense,
Efron 2004, JASA 99:96-104). ``mu`` and ``sigma`` below were fitted by ``bench/detect_roc.py`` on the calibration
half of the clean models of ``bench/null_models.py`` (mean and standard deviation of ``z``), floored at 0 and 1:
a detector is never trusted more than its own null says. The other half of the clean models, never used here,
measures the false-positive rate (docs/results-detect.md).

The verdict combines the calibrated p-values of the ``m`` detectors that examined the model by their minimum
(Tippett's min-p), with the Sidak threshold: ``p_model = 1 - (1 - min p_cal)^m``, ``suspicious`` when
``p_model < fpr``. For calibrated, independent p-values this has false-positive rate ``fpr`` exactly, whichever
detectors ran; positively dependent detectors make it conservative. The measured correlation and false-positive
rates are in docs/results-detect.md.

No numpy, no scipy: the normal quantile is the standard library's.
"""

from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["NULL", "calibrate", "combine", "fit", "p_to_z", "threshold", "z_to_p"]

# Fitted by bench/detect_roc.py on the calibration models (zoo-null, split "calibration"): name -> (mu, sigma, n).
# "nc" needs clean images of each model's task: fitted with bench/detect_fewshot_probe.py --probe nc on the same
# thirteen models (their test images, 200 each; docs/detect.md, "Neural Cleanse").
# fmt: off
NULL: dict[str, tuple[float, float, int]] = {
    "channels": (0.4591, 3.3168, 13),
    "classifier": (0.0000, 1.0000, 13),
    "mmbd": (1.2662, 1.0242, 10),
    "nc": (0.0000, 1.0000, 10),
    "freeeagle": (1.5932, 2.9069, 10),
}
# fmt: on

# p-values are clipped here (z = 7.03) before calibration: no detector's own null is credible that far out (MM-BD's
# Gamma fit gives p = 0 to clean models with one naturally dominant class), and one such clean model must not blow up
# the fitted sigma. A model at the clip is still far beyond any threshold a user sets.
_P_MIN = 1e-12
_STD = NormalDist()


def p_to_z(p: float) -> float:
    """``Phi^-1(1 - p)``, accurate for tiny ``p`` (computed as ``-Phi^-1(p)``)."""
    p = min(max(float(p), _P_MIN), 1.0 - 1e-16)
    return -_STD.inv_cdf(p)


def z_to_p(z: float) -> float:
    """``1 - Phi(z)``, accurate in the far upper tail."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def calibrate(name: str, p: float, null: dict[str, tuple[float, float, int]] | None = None) -> float:
    """The detector ``name``'s p-value recalibrated on clean models (unchanged for a detector without a null)."""
    mu, sigma, _ = (null or NULL).get(name, (0.0, 1.0, 0))
    return z_to_p((p_to_z(p) - mu) / sigma)


def fit(ps: list[float]) -> tuple[float, float, int]:
    """``(mu, sigma, n)`` of ``z`` over clean models' p-values, floored at ``(0, 1)``."""
    z = [p_to_z(p) for p in ps]
    n = len(z)
    if n < 2:
        return 0.0, 1.0, n
    mu = sum(z) / n
    sigma = math.sqrt(sum((v - mu) ** 2 for v in z) / (n - 1))
    return max(mu, 0.0), max(sigma, 1.0), n


def combine(ps: list[float]) -> float:
    """The model's p-value from its detectors' calibrated p-values: ``1 - (1 - min p)^m`` (Sidak min-p)."""
    if not ps:
        return 1.0
    m = len(ps)
    p = min(ps)
    return -math.expm1(m * math.log1p(-p)) if p < 1.0 else 1.0


def threshold(fpr: float, m: int) -> float:
    """The calibrated p-value below which one of ``m`` detectors makes the model suspicious at ``fpr``."""
    return -math.expm1(math.log1p(-fpr) / max(m, 1))
