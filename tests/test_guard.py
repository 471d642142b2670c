"""The accuracy guard (onnxclp.guard): the split, the paired drop, the strongest-within-budget rule, and the
refusal of a damaged result end to end (nothing written, exit 5)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnxclp.errors import EXIT_REFUSED, OnnxclpError
from onnxclp.guard import (
    GuardResult,
    Refused,
    blind,
    choose_strongest,
    collapse_drop,
    decide,
    images_needed,
    paired_drop,
    split_indices,
    split_parts,
)

REPO = Path(__file__).resolve().parents[1]
needs_eval = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("torch") is None,
    reason="needs the eval extra",
)


def test_split_is_seeded_disjoint_and_keeps_100():
    fit, val = split_indices(500)
    assert len(val) == 200 and len(fit) == 300  # 40 %, the default since session 14
    assert not set(fit) & set(val)
    again = split_indices(500)
    assert np.array_equal(fit, again[0]) and np.array_equal(val, again[1])
    fit, val = split_indices(2500, 0.2)
    assert len(val) == 500  # 20 %
    fit, val = split_indices(300, 0.1)
    assert len(val) == 100  # the floor


def test_split_parts_keeps_validation_and_carves_selection_from_the_fit_part():
    fit2, val2 = split_indices(500, 0.2)
    fit, sel, val = split_parts(500, 0.2, 0.2)  # sessions 6-13's split
    assert np.array_equal(val, val2)  # the final check reads the same images with or without a selection part
    assert sel is not None and (len(fit), len(sel), len(val)) == (300, 100, 100)
    assert set(fit) | set(sel) == set(fit2) and not set(fit) & set(sel)
    fit, sel, val = split_parts(2500, 0.2, select_fraction=0.1)
    assert (len(fit), len(sel), len(val)) == (1750, 250, 500)
    # the default: no selection part (candidates are tested in sequence on the validation part), 300 fit of 500
    fit, sel, val = split_parts(500)
    assert sel is None and (len(fit), len(val)) == (300, 200)
    # too few for three parts (fewer than 100 + 100 + 20), or 0: none either
    assert split_parts(210, 0.2, 0.2)[1] is None and split_parts(500, 0.2, select_fraction=0.0)[1] is None
    with pytest.raises(OnnxclpError, match="select-fraction"):
        split_parts(500, select_fraction=1.0)


def test_split_refuses_too_few_images_and_bad_fraction():
    with pytest.raises(OnnxclpError, match="too few"):
        split_indices(110)
    with pytest.raises(OnnxclpError, match="--val-fraction"):
        split_indices(500, 1.5)


def test_paired_drop_counts_only_changed_images():
    before = np.array([True] * 80 + [False] * 20)
    after = before.copy()
    d = paired_drop(before, after)
    assert d.drop == 0 and d.se == 0 and d.changed == 0 and d.p_within(0.0) == 1.0
    after[:5] = False  # 5 right answers lost
    d = paired_drop(before, after)
    assert d.drop == pytest.approx(5.0)
    assert d.changed == 5
    assert d.low < 5.0 < d.high
    assert 0.0 < d.p_within(3.0) < 0.5 < d.p_within(8.0) < 1.0
    # the selection rule's bound: 5 of 100 lost, sd of d = sqrt(.05 * .95 * 100 / 99), se = sd / 10
    assert d.bound() == pytest.approx(5.0 + 1.28 * 100 * np.sqrt(0.05 * 0.95 * 100 / 99) / 10)
    assert d.bound(0.0) == d.drop and paired_drop(before, before).bound() == 0.0


def test_choose_strongest_stops_at_first_over_budget():
    before = np.ones(100, bool)

    def right(lost: int) -> np.ndarray:
        r = before.copy()
        r[:lost] = False
        return r

    # drops 0, 1, 2, 5, 1 points: budget 3 -> index 2 (the lucky 1-point candidate after 5 is not taken)
    chosen, trials = choose_strongest([0, 1, 2, 5, 1], right, before, 3.0)
    assert chosen == 2
    assert [t["within"] for t in trials] == [True, True, True, False]
    chosen, _ = choose_strongest([10], right, before, 3.0)
    assert chosen is None


def test_decide_refuses_over_budget_unless_forced():
    before = np.ones(100, bool)
    after = before.copy()
    after[:10] = False
    g = GuardResult(400, 100, 0.2, 3.0, 1.0)
    with pytest.raises(Refused) as exc:
        decide(g, paired_drop(before, after), 0.1, force=False)
    assert exc.value.exit_code == EXIT_REFUSED
    assert "10.0 points" in exc.value.message
    g = GuardResult(400, 100, 0.2, 3.0, 1.0)
    decide(g, paired_drop(before, after), 0.1, force=True)
    assert g.forced and not g.accepted and any("WARNING" in n for n in g.notes)
    g = GuardResult(400, 100, 0.2, 3.0, 1.0, confidence=0.5)  # 0.5: the measured drop alone decides
    after = before.copy()
    after[:2] = False
    decide(g, paired_drop(before, after), 0.02, force=False)
    assert g.accepted and g.drop == pytest.approx(2.0) and g.bound == pytest.approx(2.0)
    assert "accepted" in g.summary()


def test_decide_refuses_what_the_images_cannot_show_within_budget():
    """The default check reads the drop's one-sided 90 % bound: a result that changed many of 100 images and
    measured 2 points (the session-7 BppAttack case: 8.5 points on the test images) is not shown within 3."""
    before = np.zeros(100, bool)
    before[:80] = True
    after = before.copy()
    after[:11] = False  # 11 lost ...
    after[80:89] = True  # ... 9 gained: drop 2.0, 20 changed, se ~ 4.5
    d = paired_drop(before, after)
    assert d.drop == pytest.approx(2.0) and d.changed == 20
    g = GuardResult(300, 100, 0.2, 3.0, 0.8)
    with pytest.raises(Refused) as exc:
        decide(g, d, 0.2, force=False)
    assert g.confidence == 0.9 and g.bound == pytest.approx(2.0 + 1.2816 * d.se, abs=1e-3)
    assert "cannot show" in exc.value.message and "--clean-n" in exc.value.message
    # sd per image (ddof 1) 44.9 points -> (1.2816 * 44.9 / 1.0)^2 = 3,312 images; 5x that at 20 %
    assert images_needed(d, 3.0) == 3312
    assert "about 3312 validation" in exc.value.message and "--clean-n about 16600" in exc.value.message
    assert images_needed(d, 2.0) is None
    forced = decide(GuardResult(300, 100, 0.2, 3.0, 0.8), d, 0.2, force=True)
    assert forced.forced and not forced.accepted
    assert decide(GuardResult(300, 100, 0.2, 3.0, 0.8, confidence=0.5), d, 0.2, force=False).accepted
    # the same share lost on 500 images with few changed: measured tightly, accepted at the default
    before = np.ones(500, bool)
    after = before.copy()
    after[:3] = False
    g = decide(GuardResult(1500, 500, 0.2, 3.0, 1.0), paired_drop(before, after), 0.006, force=False)
    assert g.accepted and g.bound is not None and g.drop < g.bound < 3.0
    assert "90% bound" in g.summary()
    with pytest.raises(OnnxclpError, match="--confidence"):
        decide(GuardResult(1500, 500, 0.2, 3.0, 1.0, confidence=1.0), paired_drop(before, after), 0.0, False)


def _self_labelled(tmp_path: Path, n: int = 300) -> tuple[Path, Path]:
    """The example model and clean data labelled by the model itself (its accuracy is 100 % by construction)."""
    import onnxruntime as ort

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from make_example_model import build
    finally:
        sys.path.pop(0)
    import onnx

    model = build(seed=3, planted=4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    x = rng.random((n, 3, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(n, -1).argmax(1)
    data = tmp_path / "clean.npz"
    np.savez(data, x_test=(x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1), y_test=y)
    # labels of the uint8 images as the model sees them
    xq = (np.load(data)["x_test"].transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: xq})[0].reshape(n, -1).argmax(1)
    np.savez(data, x_test=(x * 255).round().astype(np.uint8).transpose(0, 2, 3, 1), y_test=y)
    return path, data


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxclp", *args], capture_output=True, text=True, cwd=REPO)


@needs_eval
def test_guard_refuses_a_damaging_prune_and_writes_nothing(tmp_path):
    model, data = _self_labelled(tmp_path)
    out = tmp_path / "out.onnx"
    r = _cli("sanitize", str(model), str(out), "--u", "1", "--force", "--clean-data", str(data), "--clean-n", "300",
             "--max-acc-drop", "0")  # fmt: skip
    # --force also admits an over-budget result (with a warning): without it the same run is refused
    assert r.returncode == 0, r.stderr
    assert "FORCED past the budget" in r.stderr or "accepted" in r.stderr
    out.unlink(missing_ok=True)
    import json

    report = tmp_path / "r.json"
    r = _cli("sanitize", str(model), str(out), "--method", "lpp", "--u", "1.5", "--clean-data", str(data),
             "--clean-n", "300", "--max-acc-drop", "0", "--report", str(report))  # fmt: skip
    if r.returncode == 0:  # nothing changed on the validation images: accepted with the measurement
        assert json.loads(report.read_text())["guard"]["drop"] <= 0
    else:
        assert r.returncode == EXIT_REFUSED, r.stderr
        assert "refused" in r.stderr and "nothing written" in r.stderr
        assert not out.exists()


@needs_eval
def test_guard_in_the_report_and_on_the_terminal(tmp_path):
    import json

    model, data = _self_labelled(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    r = _cli("sanitize", str(model), str(out), "--clean-data", str(data), "--clean-n", "300", "--max-acc-drop",
             "100", "--report", str(report))  # fmt: skip
    assert r.returncode == 0, r.stderr
    g = json.loads(report.read_text())["guard"]
    assert g["n_val"] == 120 and g["n_select"] == 0 and g["n_fit"] == 180 and g["acc_before"] == pytest.approx(1.0)
    assert g["accepted"] is True and g["ci95"][0] <= g["drop"] <= g["ci95"][1]
    assert g["confidence"] == 0.9 and g["bound"] >= g["drop"] and g["changed"] >= 0
    assert "guard: clean accuracy 100.0%" in r.stderr and "90% bound" in r.stderr
    assert f"report: {report}" in r.stderr
    r = _cli("sanitize", str(model), str(tmp_path / "o2.onnx"), "--clean-data", str(data), "--clean-n", "300",
             "--confidence", "1")  # fmt: skip
    assert r.returncode != 0 and "--confidence must be in [0.5, 1)" in r.stderr


def test_a_validation_part_labelled_one_class_cannot_check_agreement():
    """Synthesized images the input model puts all in one class (resnet-bpp's: every one of 1,000 in its target
    class, session 10): a model answering that class for everything agrees on all of them, so the check is blind
    and refuses (or notes it under --force); balanced labels, real labels or a budget of 100 leave it alone."""
    agree = "agreement with the input model"
    right = np.ones(200, bool)  # the labels are the input's own: it agrees with all of them
    k, share, d = collapse_drop(right, np.zeros(200, int))
    assert (k, share, d.drop) == (0, 1.0, 0.0)
    g = GuardResult(800, 200, 0.2, 3.0, 1.0, metric=agree)
    with pytest.raises(Refused, match=r"answers 0 for everything would lose only 0\.0 points") as exc:
        blind(g, right, np.zeros(200, int), force=False)
    assert exc.value.exit_code == EXIT_REFUSED and "stand-in images cannot check" in exc.value.message
    g = GuardResult(800, 200, 0.2, 3.0, 1.0, metric=agree)
    assert "WARNING" in blind(g, right, np.zeros(200, int), force=True) and g.forced and not g.accepted
    labels = np.repeat(np.arange(10), 20)  # balanced: answering one class loses 90 points
    assert blind(GuardResult(800, 200, 0.2, 3.0, 1.0, metric=agree), right, labels, force=False) is None
    mostly = np.r_[np.zeros(190, int), np.arange(10)]  # 95 % one class: 5 points, within the bound's reach
    with pytest.raises(Refused):
        blind(GuardResult(800, 200, 0.2, 3.0, 1.0, metric=agree), right, mostly, force=False)
    assert blind(GuardResult(800, 200, 0.2, 100.0, 1.0, metric=agree), right, mostly, force=False) is None
    # real labels (clean accuracy), all of one class: a constant answer passes too (session 19: refused as well)
    with pytest.raises(Refused, match=r"scores 100\.0% on them .* would score 100\.0% .*Give images of every class"):
        blind(GuardResult(800, 200, 0.2, 3.0, 1.0), right, np.zeros(200, int), force=False)
    assert blind(GuardResult(800, 200, 0.2, 3.0, 1.0), right, labels, force=False) is None  # balanced: it can see


def test_real_labels_the_input_scores_near_chance_on_cannot_check_a_repair():
    """Balanced real labels but an input at chance (images fed the wrong way): a constant answer loses nothing, so
    the check is blind; the message says what to check. An input that scores well leaves the check alone."""
    labels = np.repeat(np.arange(10), 20)
    chance = labels == (np.arange(200) % 7)  # right on about one image in ten
    with pytest.raises(Refused, match=r"Check that --mean/--std, the labels and the image layout"):
        blind(GuardResult(800, 200, 0.2, 3.0, 1.0), chance, labels, force=False)
    g = GuardResult(800, 200, 0.2, 3.0, 1.0)
    assert "cannot check" in (blind(g, chance, labels, force=True) or "") and g.forced
    good = np.arange(200) % 10 != 0  # 90 %
    assert blind(GuardResult(800, 200, 0.2, 3.0, 1.0), good, labels, force=False) is None


def test_choose_strongest_can_hold_the_candidates_to_the_bound():
    """With ``z``, a candidate is within when its drop's one-sided bound is: a candidate that loses 2 of 300
    images (0.7 points) is within 1 point on the measured drop and over it on the 90 % bound."""
    import numpy as np

    from onnxclp.guard import choose_strongest

    before = np.ones(300, dtype=bool)

    def measure(lost: int) -> np.ndarray:
        right = before.copy()
        right[:lost] = False
        return right

    assert choose_strongest([0, 2, 6], measure, before, 1.0)[0] == 1
    assert choose_strongest([0, 2, 6], measure, before, 1.0, z=1.2816)[0] == 0
