"""The accuracy guard: a method given clean images never hands back a model it can measure as broken.

The clean labelled images the user gives (``--clean-data``) are split once, seeded, into the part a method may
train on (to fit masks, fine-tune, invert triggers) and a **validation part it never trains on**
(``--val-fraction``, default 40 %, at least :data:`MIN_VAL` images), which tests the method's candidates in a
fixed sequence and checks the result (below). The input model's and the result's clean accuracy are measured
on the validation part with onnxruntime; a result the guard cannot show within ``--max-acc-drop`` points (the
rule below) is not written (exit :data:`~onnxclp.errors.EXIT_REFUSED`) unless ``--force``.

How sure the guard is. Both models classify the *same* validation images, so the drop is a paired difference:
with ``d_i = [input right on i] - [result right on i]``, the drop is ``mean(d)`` and its standard error
``sd(d) / sqrt(n)`` (only the images whose correctness changed contribute: a repair that changes few
predictions is measured tightly even on 100 images, one that changes many is not). The rule:

- **refused** when the drop's one-sided upper bound at ``--confidence`` (default :data:`DEFAULT_CONFIDENCE`, 90 %:
  ``drop + 1.28 se``, :meth:`Drop.bound`) exceeds the budget: either the model is measured as broken, or the
  validation images cannot show that it is not (the message says which, and what to try: more clean images,
  a gentler setting, ``--confidence 0.5`` to decide on the measured drop alone, or ``--force``);
- **accepted** otherwise; the report gives the bound, the drop's two-sided 95 % interval and the probability
  (normal approximation) that the true drop is within the budget.

Until session 8 the check decided on the measured drop alone (``--confidence 0.5`` still does). That passed a
broken model: clp-npd-fst on the BppAttack model lost 2.0 points on its 100 validation images (within a
3-point budget) and 8.5 points on 3,000 test images. With the bound, a result that changes many predictions
needs either a clearly smaller measured drop or more validation images; a result that changes few (pruning a
handful of channels) is measured tightly and passes as before.

With ``--select-fraction`` F (sessions 6-13 ran this way by default), a method with a strength knob (checkpoints of
a fine-tuning run, the number of pruned neurons) chooses it with
:func:`choose_strongest`: the strongest candidate whose measured drop on the **selection part** stays within the
budget, walking from the weakest up and stopping at the first one over budget (accuracy is not monotone in the
strength on a few hundred images: a lucky strong candidate beyond a failing one is not taken). The selection part
is a third part of the images (:func:`split_parts`, taken from the method's part), so the final check reads images that neither trained nor chose anything: choosing the
luckiest of many candidates on the images that then judge the result made the reported drop optimistic (measured:
2-3 points on the check, 3.5-5.7 on 3,000 test images). With too few images for three parts the candidates are
tested in sequence on the validation part (below), and the report says so (``selected_on_validation``,
``tested_in_sequence``).

Choosing the strongest candidate whose *measured* drop on the selection part is within budget puts the choice at
the budget's edge, where the independent check on the validation part then finds it over budget about half the
time (measured in session 6: clp-npd-fst with 2,500 images, 500 of them selecting, was refused at 4.2 points on
preact-badnets). So a repair's epochs and the tuning's step back take a candidate only when the drop's one-sided
90 % upper bound on the selection part (``drop + SELECT_Z * se``, :meth:`Drop.bound`) is within budget: with 100
selection images that asks for about 1.5 points of room, with 500 for about 0.7.

**Testing candidates in sequence** (the default since session 14; docs/algorithms.md, "Testing candidates in
sequence"): without a selection part (``--select-fraction`` 0, the default), the candidates are tested on the
validation part in an order fixed before it is read, weakest first, each with the final check's own rule (its
drop's one-sided bound at ``--confidence`` within the budget), stopping at the first that fails: a training run's
end (learning rates, AC's weights, fst-head's alphas in the walk's order), the tuning pass's ``u`` from the
weakest up, ANP's counts from the smallest up. Every accepted candidate is then within budget together with at
least the single check's confidence (fixed-sequence testing; Angelopoulos et al., "Learn then Test",
arXiv:2110.01052), so the strongest is written. The selection part's 100 images (at 500 given) join the
validation part: 200 images check, 300 fit, as before.

Nothing here is imported by the weight-only sanitize path unless clean images are given: onnxruntime and torch
are imported inside the functions that need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from onnxclp.errors import EXIT_REFUSED, OnnxclpError

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_MAX_ACC_DROP",
    "DEFAULT_SELECT_FRACTION",
    "DEFAULT_VAL_FRACTION",
    "MIN_VAL",
    "SELECT_Z",
    "SYNTHETIC_VAL_FRACTION",
    "GuardResult",
    "Refused",
    "choose_strongest",
    "images_needed",
    "isotonic",
    "paired_drop",
    "split_indices",
    "split_parts",
    "z_of",
]

DEFAULT_VAL_FRACTION = 0.4  # the validation part: it tests the method's candidates in sequence, then checks
DEFAULT_SELECT_FRACTION = 0.0  # no selection part by default (docs/algorithms.md, "Testing candidates in sequence")
SYNTHETIC_VAL_FRACTION = 0.2  # --clean-data synthetic: the procedural validation images' share (its own split)
SELECT_Z = 1.28  # a candidate is chosen when its drop's one-sided 90 % upper bound on the selection part is in budget
DEFAULT_CONFIDENCE = 0.9  # the final check accepts when the drop's one-sided 90 % upper bound is within budget
DEFAULT_MAX_ACC_DROP = 3.0  # points of clean accuracy
MIN_VAL = 100  # validation images at least (about +-4 points of accuracy at 80 %: 1.96 * sqrt(.8 * .2 / 100))
MIN_FIT = 20  # images left for the method to use at least
SPLIT_SEED = 0


class Refused(OnnxclpError):
    """The guard cannot show the result within the accuracy budget on the validation part: not written."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_REFUSED)


def split_indices(n: int, val_fraction: float = DEFAULT_VAL_FRACTION, min_val: int = MIN_VAL,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(fit, validation) indices of ``n`` images: a seeded permutation, ``max(min_val, round(val_fraction * n))``
    images for validation, the rest for the method. Raises :class:`OnnxclpError` when fewer than
    ``min_val + MIN_FIT`` images are given or the fraction is outside (0, 1)."""
    fit, _, val = split_parts(n, val_fraction, 0.0, min_val, seed)
    return fit, val


def split_parts(n: int, val_fraction: float = DEFAULT_VAL_FRACTION,
                select_fraction: float | None = DEFAULT_SELECT_FRACTION, min_val: int = MIN_VAL,
                seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:  # fmt: skip
    """(fit, selection, validation) indices of ``n`` images from one seeded permutation.

    The validation part (the guard's final check, read by nothing else) is the permutation's first
    ``max(min_val, round(val_fraction * n))`` images, the same as :func:`split_indices`'. The selection part
    (what chooses among a method's candidates: epochs, counts, strengths) is the next
    ``max(min_val, round(select_fraction * n))`` (``select_fraction`` None: :data:`DEFAULT_SELECT_FRACTION`, 0), taken from
    the method's part only when at least :data:`MIN_FIT` images are left to fit on; otherwise, or with
    ``select_fraction`` 0, it is None: candidates are then chosen on the validation part (the report says so).
    """
    if not 0.0 < val_fraction < 1.0:
        raise OnnxclpError(f"--val-fraction must be between 0 and 1, got {val_fraction:g}")
    share = DEFAULT_SELECT_FRACTION if select_fraction is None else select_fraction
    if not 0.0 <= share < 1.0:
        raise OnnxclpError(f"--select-fraction must be in [0, 1), got {share:g}")
    n_val = max(min_val, round(val_fraction * n))
    if n - n_val < MIN_FIT:
        raise OnnxclpError(
            f"{n} clean images are too few: the guard keeps {n_val} apart for validation (--val-fraction "
            f"{val_fraction:g}, at least {min_val}) and a method needs at least {MIN_FIT} more; give more "
            "images (--clean-n) or a smaller --val-fraction"
        )
    perm = np.random.default_rng(seed).permutation(n)
    n_sel = max(min_val, round(share * n)) if share > 0 else 0
    if n_sel == 0 or n - n_val - n_sel < MIN_FIT:
        return np.sort(perm[n_val:]), None, np.sort(perm[:n_val])
    return np.sort(perm[n_val + n_sel :]), np.sort(perm[n_val : n_val + n_sel]), np.sort(perm[:n_val])


@dataclass
class Drop:
    """A paired accuracy drop in points: the estimate, its standard error and the 95 % interval."""

    acc_before: float  # fraction
    acc_after: float  # fraction
    drop: float  # points
    se: float  # points
    n: int
    changed: int  # images whose correctness changed

    @property
    def low(self) -> float:
        return self.drop - 1.96 * self.se

    @property
    def high(self) -> float:
        return self.drop + 1.96 * self.se

    def bound(self, z: float = SELECT_Z) -> float:
        """The drop's one-sided upper bound at ``z`` standard errors (``SELECT_Z``: 90 %), in points."""
        return self.drop + z * self.se

    def p_within(self, budget: float) -> float:
        """P(true drop <= budget) under the normal approximation (1 or 0 when nothing changed)."""
        if self.se <= 0:
            return 1.0 if self.drop <= budget + 1e-9 else 0.0
        return 0.5 * (1.0 + math.erf((budget - self.drop) / (self.se * math.sqrt(2.0))))


def z_of(confidence: float) -> float:
    """Standard normal quantile of a one-sided ``confidence`` in [0.5, 1) (0.5: 0, the measured drop alone)."""
    if not 0.5 <= confidence < 1.0:
        raise OnnxclpError(f"--confidence must be in [0.5, 1), got {confidence:g}")
    return NormalDist().inv_cdf(confidence)


def images_needed(drop: Drop, budget: float, confidence: float = DEFAULT_CONFIDENCE) -> int | None:
    """Validation images whose paired check would put ``drop``'s bound at ``confidence`` within ``budget`` if its
    measured drop and per-image spread held (None when the measured drop is not below the budget)."""
    gap = budget - drop.drop
    if gap <= 0:
        return None
    sd = drop.se * math.sqrt(drop.n)  # points per image
    return max(drop.n, math.ceil((z_of(confidence) * sd / gap) ** 2))


def isotonic(values: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``values`` in squared error (pool-adjacent-violators; pure numpy):
    a noisy measured drop read as a curve that cannot fall when the method gets stronger."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in np.asarray(values, dtype=np.float64).ravel():
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks]) if blocks else np.zeros(0)


def paired_drop(right_before: np.ndarray, right_after: np.ndarray) -> Drop:
    """The drop of accuracy from ``right_before`` to ``right_after`` (boolean per image, same images)."""
    a = np.asarray(right_before, dtype=np.float64)
    b = np.asarray(right_after, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError("paired_drop needs two boolean vectors of the same non-zero length")
    d = a - b
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return Drop(float(a.mean()), float(b.mean()), 100.0 * float(d.mean()), 100.0 * se, n, int(np.count_nonzero(d)))


def choose_strongest(candidates: Sequence[Any], measure: Callable[[Any], np.ndarray], right_before: np.ndarray,
                     budget: float, z: float = 0.0) -> tuple[int | None, list[dict[str, Any]]]:  # fmt: skip
    """Index of the strongest candidate within ``budget`` (candidates ordered weakest first), and the trials.

    ``measure(candidate)`` returns the boolean correctness per validation image. Within: the measured drop (``z``
    0), or its one-sided bound at ``z``, at most ``budget``. The walk stops at the first candidate over budget; None
    when even the weakest is over.
    """
    chosen: int | None = None
    trials: list[dict[str, Any]] = []
    for i, c in enumerate(candidates):
        d = paired_drop(right_before, measure(c))
        within = (d.bound(z) if z > 0 else d.drop) <= budget + 1e-9
        trials.append({"candidate": c, "acc": d.acc_after, "drop": d.drop, "within": within})
        if not within:
            break
        chosen = i
    return chosen, trials


@dataclass
class GuardResult:
    """What the guard measured and decided (the report's ``guard`` entry)."""

    n_fit: int
    n_val: int
    val_fraction: float
    budget: float
    acc_before: float
    acc_after: float | None = None
    drop: float | None = None
    se: float | None = None
    ci95: tuple[float, float] | None = None
    p_within: float | None = None
    confidence: float = DEFAULT_CONFIDENCE  # one-sided: the check accepts when the drop's bound here is in budget
    bound: float | None = None  # the drop's one-sided upper bound at ``confidence``, points
    changed: int | None = None  # validation images whose correctness changed (they alone make the drop's se)
    changed_predictions: float | None = None  # share of validation images whose predicted class changed
    accepted: bool | None = None
    forced: bool = False
    selected_on_validation: bool = False  # candidates were chosen on the validation part (no selection part)
    tested_in_sequence: bool = False  # ... tested there in fixed sequence at ``confidence`` (a valid check)
    n_select: int = 0  # images of the selection part (0: none; candidates, if any, chosen on the validation part)
    metric: str = "clean accuracy"  # "agreement with the input model" on synthesized images
    data: str = ""
    notes: list[str] = field(default_factory=list)
    tuned: dict[str, Any] | None = None  # the method's strength chosen on the fit part (onnxclp.passes.tune)
    unmeasured: str | None = None  # why the validation images cannot measure what the method changed (its own rule)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the terminal."""
        if self.acc_after is None or self.drop is None:
            return f"guard: {self.metric} of the input {100 * self.acc_before:.1f}% on {self.n_val} validation images"
        assert self.ci95 is not None and self.p_within is not None
        verdict = "accepted" if self.accepted else ("FORCED past the budget" if self.forced else "refused")
        if self.tested_in_sequence:
            used = "the method did not train on (they tested its candidates in sequence)"
        elif self.selected_on_validation:
            used = "the method did not train on (they chose among its candidates)"
        else:
            used = "the method never used"
        return (
            f"guard: {self.metric} {100 * self.acc_before:.1f}% -> {100 * self.acc_after:.1f}% on {self.n_val} "
            f"validation images {used}: drop {self.drop:.1f} pt ({100 * self.confidence:.0f}% bound "
            f"{self.bound if self.bound is not None else self.drop:.1f}; 95% CI {self.ci95[0]:.1f} to "
            f"{self.ci95[1]:.1f}; P(within {self.budget:g} pt) {100 * self.p_within:.0f}%): {verdict}"
        )


def collapse_drop(right_before: np.ndarray, labels: np.ndarray) -> tuple[int, float, Drop]:
    """What a model that answers one class for everything would lose on these validation images: the most
    frequent label ``k``, its share, and the paired drop from ``right_before`` to answering ``k``. With real,
    balanced labels that drop is most of the accuracy; with labels a model gave (``--clean-data synthetic``) it
    can be near 0, when the input model maps most of the images to one class (a backdoor's target does that to
    procedural images): then no repair's agreement there says anything."""
    y = np.asarray(labels).astype(np.int64).ravel()
    if y.size == 0:
        raise ValueError("collapse_drop needs labels")
    values, counts = np.unique(y, return_counts=True)
    k = int(values[np.argmax(counts)])
    return k, float(np.mean(y == k)), paired_drop(right_before, y == k)


# the note --force leaves when the validation images cannot see a collapsed model (:func:`blind`); the bench reads
# its refusal reason after it
BLIND_NOTE = "WARNING: --force wrote a model the guard cannot check: "


def blind(result: GuardResult, right_before: np.ndarray, labels: np.ndarray, force: bool) -> str | None:
    """The guard's check is blind when a model answering one class for everything would pass it: its drop's
    lower bound at ``result.confidence`` (the mirror of the acceptance rule) is within the budget. Then no result
    can be certified on these images: :class:`Refused`, unless ``force`` (a note then, returned). None when the
    check can see such a collapse. Applies under a budget below 100 points, to agreement with the input model
    (``--clean-data synthetic``: the labels are the input's own) and, since session 19, to clean accuracy: an
    input model that scores near a constant answer on the user's labelled images (the wrong normalisation,
    labels or layout) leaves nothing for the check to protect. A method that found its own change unmeasurable
    on these images (``result.unmeasured``: the target gate's classes, :mod:`onnxclp.methods.fst_gate`) is refused
    the same way, whatever the labels."""
    if result.unmeasured is not None and result.budget < 100.0:
        why = result.unmeasured
    else:
        if result.budget >= 100.0:
            return None  # a budget of 100: nothing to check
        k, share, d = collapse_drop(right_before, labels)
        low = d.drop - z_of(result.confidence) * d.se
        if low > result.budget + 1e-9:
            return None
        if result.metric == "clean accuracy":  # real labels: the input scores about what a constant answer does
            why = (
                f"the validation images cannot show a model is not broken: the input model scores "
                f"{100 * float(np.mean(right_before)):.1f}% on them and a model that answers class {k} for "
                f"everything would score {100 * share:.1f}% ({'a loss' if d.drop >= 0 else 'a gain'} of "
                f"{abs(d.drop):.1f} points, which the check would pass at --max-acc-drop {result.budget:g}). "
                + (
                    "Give images of every class"
                    if share >= 0.5
                    else "Check that --mean/--std, the labels and the image layout are the model's (an input "
                    "near chance on its own task's images is usually fed the wrong way)"
                )
            )
        else:
            why = (
                f"the validation images cannot show a model is not broken: {100 * share:.0f}% of them are labelled "
                f"class {k}, so a model that answers {k} for everything would lose only {d.drop:.1f} points of "
                f"{result.metric} there (budget --max-acc-drop {result.budget:g}); the input model puts most "
                "synthesized images in one class, as a backdoor's target class can: stand-in images cannot check a "
                "repair of this model"
            )
    if force:
        result.forced = True
        result.accepted = False
        note = BLIND_NOTE + why
        result.notes.append(note)
        return note
    if result.metric == "clean accuracy" and result.unmeasured is None:
        raise Refused(f"refused: {why}; nothing written. --force writes it anyway")
    raise Refused(f"refused: {why}; nothing written. Give (more) real clean images (--clean-data CLEAN.npz), or "
                  "--force to write it anyway")  # fmt: skip


def decide(result: GuardResult, drop: Drop, changed: float, force: bool) -> GuardResult:
    """Fill ``result`` from the measured ``drop`` and apply the rule of the module docstring (raises
    :class:`Refused` when the drop's bound at ``result.confidence`` is past the budget, unless ``force``)."""
    result.acc_after = drop.acc_after
    result.drop = drop.drop
    result.se = drop.se
    result.ci95 = (drop.low, drop.high)
    result.p_within = drop.p_within(result.budget)
    result.changed_predictions = changed
    result.bound = drop.bound(z_of(result.confidence))
    result.changed = drop.changed
    conf = f"{100 * result.confidence:.0f}%"
    measured_over = drop.drop > result.budget + 1e-9
    result.accepted = not measured_over and result.bound <= result.budget + 1e-9
    if result.accepted:
        if drop.high > result.budget:
            result.notes.append(
                f"guard: the drop's 95% interval reaches {drop.high:.1f} pt, past the {result.budget:g} pt budget "
                f"(its {conf} bound {result.bound:.1f} is within); more clean images (--clean-n) would tighten it"
            )
        return result
    lost = (
        f"the result lost {drop.drop:.1f} points of {result.metric} on {result.n_val} validation images "
        f"({100 * drop.acc_before:.1f}% -> {100 * drop.acc_after:.1f}%"
    )
    if measured_over:
        why = f"{lost}; budget --max-acc-drop {result.budget:g})"
        tries = "a gentler setting, another --method"
    else:  # within on the measured drop, not on its bound: what would certify it is more images
        why = (
            f"{lost}), but {drop.changed} of them changed correctness, so the drop's {conf} upper bound is "
            f"{result.bound:.1f} points, past the budget (--max-acc-drop {result.budget:g}): these images cannot "
            "show it is within"
        )
        need = images_needed(drop, result.budget, result.confidence)
        if need is not None:
            why += (
                f"; if the measured drop and spread held, about {need} validation images would show it within "
                f"(--clean-n about {math.ceil(need / result.val_fraction / 50) * 50} at --val-fraction "
                f"{result.val_fraction:g})"
            )
        tries = (
            "more clean images (--clean-n) for a tighter check, a gentler setting, another --method, --confidence "
            "0.5 to decide on the measured drop alone"
        )
    if force:
        result.forced = True
        result.notes.append(f"WARNING: --force wrote a model the guard refuses: {why}")
        return result
    raise Refused(f"refused: {why}; nothing written. Try {tries}, or --force to write it anyway")
