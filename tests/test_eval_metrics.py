"""ACC / ASR / RA (docs/algorithms.md, "Metrics") on hand-made predictions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxclp.eval.attacks import attacked_mask
from onnxclp.eval.metrics import MetricCounts, accuracy, agreement, attack_success_rate, robust_accuracy


def test_a2o_asr_excludes_target_class_samples() -> None:
    y = np.array([0, 0, 1, 2, 2, 1])
    pred_triggered = np.array([0, 0, 0, 0, 2, 1])
    # target 0: the two class-0 samples are not counted; of the four others, two go to 0
    assert attack_success_rate(pred_triggered, y, 0, "a2o", 3) == 2 / 4
    assert robust_accuracy(pred_triggered, y, 0, "a2o") == 2 / 4
    # had they been counted, the rate would have been 4/6
    assert attack_success_rate(pred_triggered, y, 0, "a2o", 3) != 4 / 6
    # target 2: the class-2 samples drop out instead
    assert attack_success_rate(pred_triggered, y, 2, "a2o", 3) == 0 / 4


def test_a2a_targets_the_next_class_and_counts_everything() -> None:
    y = np.array([0, 1, 2, 2])
    pred_triggered = np.array([1, 2, 0, 2])
    assert attack_success_rate(pred_triggered, y, 0, "a2a", 3) == 3 / 4
    assert robust_accuracy(pred_triggered, y, 0, "a2a") == 1 / 4


def test_accuracy_agreement_and_empty_sets() -> None:
    assert accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == 2 / 3
    assert agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 3 / 4
    assert accuracy(np.array([]), np.array([])) is None
    # a2o on a set holding only the target class: nothing is attacked
    assert attack_success_rate(np.array([0, 0]), np.array([0, 0]), 0, "a2o", 2) is None
    counts = MetricCounts(0, "a2o", 2)
    assert (counts.acc, counts.asr, counts.ra) == (None, None, None)


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60),
    target=st.integers(0, 4),
    mode=st.sampled_from(["a2o", "a2a"]),
    batch=st.integers(1, 7),
)
def test_streaming_counts_equal_whole_array_metrics(
    data: list[tuple[int, int, int]], target: int, mode: str, batch: int
) -> None:
    y, pred, pred_trig = (np.array(col) for col in zip(*data, strict=True))
    counts = MetricCounts(target, mode, 5)
    for i in range(0, len(y), batch):
        yb, pb, tb = y[i : i + batch], pred[i : i + batch], pred_trig[i : i + batch]
        keep = attacked_mask(yb, target, mode)
        counts.add_clean(pb, yb)
        counts.add_triggered(tb[keep], yb[keep])
    assert counts.acc == accuracy(pred, y)
    assert counts.asr == attack_success_rate(pred_trig, y, target, mode, 5)
    assert counts.ra == robust_accuracy(pred_trig, y, target, mode)
