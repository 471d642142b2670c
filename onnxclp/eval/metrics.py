"""ACC, ASR and RA (docs/algorithms.md, "Metrics"), computed from predicted labels (numpy only), and the label rules.

- ACC: top-1 accuracy on the clean set.
- ASR: fraction of triggered inputs classified as the attack's target label. All-to-one (target t): only samples
  whose true label is not t are triggered and counted. All-to-all: target (y + 1) mod C, every sample counts.
- RA: fraction of the same triggered inputs still classified as their true label.

:class:`Metrics` is the one metrics type of evaluate, compare, sweep and calibrate: it accumulates the counts
batch by batch (so that a whole data set never has to be held in memory) and gives the rates; the plain
functions compute the same numbers from whole arrays (used by the tests as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxclp.errors import OnnxclpError

__all__ = [
    "MODES",
    "MetricCounts",
    "Metrics",
    "accuracy",
    "agreement",
    "attack_success_rate",
    "attacked_mask",
    "robust_accuracy",
    "target_labels",
]

MODES = ("a2o", "a2a")


def attacked_mask(y: np.ndarray, target: int, mode: str) -> np.ndarray:
    """Which samples are triggered and counted for ASR/RA: a2o excludes the target class, a2a keeps all."""
    y = np.asarray(y)
    if mode == "a2o":
        return y != target
    if mode == "a2a":
        return np.ones(y.shape, dtype=bool)
    raise OnnxclpError(f"unknown attack mode {mode!r} (expected one of {', '.join(MODES)})")


def target_labels(y: np.ndarray, target: int, mode: str, num_classes: int) -> np.ndarray:
    """The label a successful attack produces for each true label ``y``: ``target`` (a2o) or (y+1) mod C (a2a)."""
    y = np.asarray(y, dtype=np.int64)
    if mode == "a2o":
        return np.full_like(y, target)
    if mode == "a2a":
        return (y + 1) % num_classes
    raise OnnxclpError(f"unknown attack mode {mode!r} (expected one of {', '.join(MODES)})")


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    """Top-1 accuracy; ``None`` for an empty set."""
    pred, y = np.asarray(pred), np.asarray(y)
    return _ratio(int((pred == y).sum()), y.size)


def attack_success_rate(
    pred_triggered: np.ndarray, y: np.ndarray, target: int, mode: str, num_classes: int
) -> float | None:
    """ASR from the predictions on the triggered version of *every* sample; a2o drops target-class samples."""
    pred_triggered, y = np.asarray(pred_triggered), np.asarray(y)
    keep = attacked_mask(y, target, mode)
    hits = pred_triggered[keep] == target_labels(y[keep], target, mode, num_classes)
    return _ratio(int(hits.sum()), int(keep.sum()))


def robust_accuracy(pred_triggered: np.ndarray, y: np.ndarray, target: int, mode: str) -> float | None:
    """RA: triggered samples (the ASR subset) still classified as their true label."""
    pred_triggered, y = np.asarray(pred_triggered), np.asarray(y)
    keep = attacked_mask(y, target, mode)
    return _ratio(int((pred_triggered[keep] == y[keep]).sum()), int(keep.sum()))


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float | None:
    """Fraction of samples on which two models predict the same class."""
    pred_a, pred_b = np.asarray(pred_a), np.asarray(pred_b)
    return _ratio(int((pred_a == pred_b).sum()), pred_a.size)


@dataclass
class Metrics:
    """ACC, ASR and RA of one model with the counts behind them (rates are None for an empty set).

    Built empty for an attack's ``target``/``mode`` and a ``num_classes``-class model, then fed one batch at a
    time with :meth:`add_clean` and :meth:`add_triggered`.
    """

    target: int
    mode: str
    num_classes: int
    clean_total: int = 0
    clean_correct: int = 0
    attack_total: int = 0
    attack_hits: int = 0
    attack_robust: int = 0

    def add_clean(self, pred: np.ndarray, y: np.ndarray) -> None:
        """Predictions on clean samples with their labels."""
        self.clean_total += int(np.asarray(y).size)
        self.clean_correct += int((np.asarray(pred) == np.asarray(y)).sum())

    def add_triggered(self, pred: np.ndarray, y: np.ndarray) -> None:
        """Predictions on triggered samples that belong to the attacked subset, with their *true* labels."""
        pred, y = np.asarray(pred), np.asarray(y)
        self.attack_total += int(y.size)
        self.attack_hits += int((pred == target_labels(y, self.target, self.mode, self.num_classes)).sum())
        self.attack_robust += int((pred == y).sum())

    @property
    def acc(self) -> float | None:
        return _ratio(self.clean_correct, self.clean_total)

    @property
    def asr(self) -> float | None:
        return _ratio(self.attack_hits, self.attack_total)

    @property
    def ra(self) -> float | None:
        return _ratio(self.attack_robust, self.attack_total)

    def to_dict(self) -> dict[str, Any]:
        """The rates and their counts (JSON-ready)."""
        return {
            "acc": self.acc,
            "asr": self.asr,
            "ra": self.ra,
            "clean_correct": self.clean_correct,
            "clean_total": self.clean_total,
            "attack_hits": self.attack_hits,
            "attack_robust": self.attack_robust,
            "attack_total": self.attack_total,
        }


MetricCounts = Metrics  # the former name of the accumulator
