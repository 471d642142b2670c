"""ACC, ASR and RA as defined in docs/algorithms.md, "Metrics", computed from predicted labels (numpy only).

- ACC: top-1 accuracy on the clean set.
- ASR: fraction of triggered inputs classified as the attack's target label. All-to-one (target t): only samples
  whose true label is not t are triggered and counted. All-to-all: target (y + 1) mod C, every sample counts.
- RA: fraction of the same triggered inputs still classified as their true label.

:class:`MetricCounts` accumulates the counts batch by batch, so that a whole data set never has to be held in
memory; the plain functions compute the same numbers from whole arrays (used by the tests as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxclp.eval.attacks import attacked_mask, target_labels

__all__ = [
    "MetricCounts",
    "accuracy",
    "agreement",
    "attack_success_rate",
    "robust_accuracy",
]


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
class MetricCounts:
    """Running counts for one model; ``add_clean`` and ``add_triggered`` take one batch each."""

    target: int
    mode: str
    num_classes: int
    clean_total: int = 0
    clean_correct: int = 0
    attack_total: int = 0
    attack_hits: int = 0
    attack_robust: int = 0

    def add_clean(self, pred: np.ndarray, y: np.ndarray) -> None:
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
