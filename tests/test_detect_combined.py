"""The combined verdict (issue 20, items 2-3): each detector's p-value recalibrated on clean models, Sidak min-p
over the detectors that ran; MM-BD in the default scan when torch is installed, skipped with the reason when it
is not; the unverified path still failing closed. Tiny onnx.helper models (3x8x8 inputs): seconds each."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_gate_verdicts import conv_head, invoke, matmul_head, no_classifier, save, scan

from onnxclp import detect
from onnxclp.detect import DetectorResult, _null
from onnxclp.errors import EXIT_UNVERIFIED

# --- the rule ------------------------------------------------------------------------------------------------------


def test_normal_scale_round_trip_and_clip() -> None:
    for p in (0.5, 0.01, 1e-6, 1e-11):
        assert _null.z_to_p(_null.p_to_z(p)) == pytest.approx(p, rel=1e-6)
    assert _null.p_to_z(0.0) == _null.p_to_z(1e-12) == pytest.approx(7.034, abs=1e-3)  # clipped: finite
    assert math.isfinite(_null.p_to_z(1.0))


def test_calibration_moves_a_p_value_by_the_clean_models_null() -> None:
    null = {"d": (2.0, 1.5, 12)}  # clean models' z: mean 2, sd 1.5 (the detector's own null is optimistic)
    p = 1e-3  # z = 3.09: (3.09 - 2) / 1.5 = 0.73 -> p_cal = 0.23
    assert _null.calibrate("d", p, null) == pytest.approx(_null.z_to_p((_null.p_to_z(p) - 2.0) / 1.5))
    assert 0.2 < _null.calibrate("d", p, null) < 0.25
    assert _null.calibrate("unknown", p, null) == pytest.approx(p)  # no null: its own p-value


def test_fit_is_floored_at_the_detectors_own_null() -> None:
    mu, sigma, n = _null.fit([0.5, 0.6, 0.4, 0.55])  # tight and conservative: never trusted more than its own null
    assert (mu, sigma, n) == (0.0, 1.0, 4)
    mu, sigma, _ = _null.fit([1e-6, 0.3, 0.01, 0.5, 0.02])
    assert mu > 0 and sigma > 1


def test_combine_is_sidak_min_p() -> None:
    assert _null.combine([0.004, 0.5]) == pytest.approx(1 - (1 - 0.004) ** 2)
    assert _null.combine([0.3]) == pytest.approx(0.3)
    assert _null.combine([]) == 1.0
    assert _null.threshold(0.01, 2) == pytest.approx(1 - 0.99**0.5)


@pytest.mark.parametrize("m", [1, 2, 3])
def test_false_positive_rate_is_fpr_whichever_detectors_ran(m: int) -> None:
    """Calibrated p-values (uniform on clean models) and independent: the rule flags fpr of clean models for any
    number of detectors, not fpr / m (Bonferroni) or m * fpr (no correction)."""
    rng = np.random.default_rng(m)
    ps = rng.uniform(size=(40_000, m))
    flagged = np.mean([_null.combine(list(row)) < 0.05 for row in ps])
    assert flagged == pytest.approx(0.05, abs=0.005)


def test_verdict_uses_calibrated_p_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_null.NULL, "a", (2.0, 1.5, 12))
    monkeypatch.setitem(_null.NULL, "b", (0.0, 1.0, 12))
    # a's own p-value 1e-3 is ordinary for a on clean models; b's 1e-4 is not
    results = {"a": DetectorResult(3.1, 1e-3, target=1), "b": DetectorResult(3.7, 1e-4, target=4)}
    verdict, target, p = detect.verdict(results, 0.01)
    assert (
        verdict == "suspicious"
        and target == 4
        and p == pytest.approx(_null.combine([results["a"].p_calibrated or 1, 1e-4]))
    )
    assert not results["a"].suspicious and results["b"].suspicious
    assert results["a"].threshold == pytest.approx(_null.threshold(0.01, 2))
    results = {"a": DetectorResult(3.1, 1e-3, target=1)}
    assert detect.verdict(results, 0.01)[:2] == ("clean", None)
    assert detect.verdict({}, 0.01) == ("unverified", None, None)


# --- MM-BD in the default scan -------------------------------------------------------------------------------------


def test_default_detectors_include_mmbd() -> None:
    assert detect.default_names()[-1] == "mmbd" and "classifier" in detect.default_names()


def test_default_scan_runs_mmbd_when_torch_is_installed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    entry = scan(save(conv_head(1, target=3), tmp_path / "m.onnx"))
    assert set(entry["detectors"]) == {"classifier", "mmbd"}, entry["detectors_skipped"]
    d = entry["detectors"]["mmbd"]
    assert 0 <= d["p_value"] <= 1 and 0 <= d["p_calibrated"] <= 1 and d["target"] in range(10)
    assert d["threshold"] == pytest.approx(_null.threshold(0.01, 2))
    assert entry["verdict"] == "suspicious" and entry["target"] == 3  # the planted classifier row
    assert entry["p_value"] == pytest.approx(
        _null.combine([entry["detectors"][n]["p_calibrated"] for n in ("classifier", "mmbd")])
    )


def test_default_mmbd_reads_a_kxk_head(tmp_path: Path) -> None:
    """A 3x3-convolution head the classifier detector cannot read: MM-BD examines it (2-D logits), so the default
    scan gives a verdict instead of unverified."""
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    entry = scan(save(conv_head(3), tmp_path / "m.onnx"))
    assert entry["verdict"] in ("clean", "suspicious") and "mmbd" in entry["detectors"]
    assert "3x3 Conv" in entry["detectors_skipped"]["classifier"]
    pooled = scan(save(conv_head(1, pool="before"), tmp_path / "p.onnx"))  # logits N x K x 1 x 1
    assert "mmbd" in pooled["detectors"], pooled["detectors_skipped"]


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if torch were not installed: MM-BD finds it missing (the weight-only detectors never import it)."""
    import onnxclp.detect.mmbd as mod

    monkeypatch.setattr(mod, "missing_modules", lambda: ["torch"])


def test_mmbd_skipped_without_torch_says_why(no_torch: None, tmp_path: Path) -> None:
    path = save(matmul_head(target=2), tmp_path / "m.onnx")
    entry = scan(path)
    assert set(entry["detectors"]) == {"classifier"}
    assert entry["detectors_skipped"]["mmbd"].startswith("skipped: torch not installed")
    assert "onnxclp[eval]" in entry["detectors_skipped"]["mmbd"]
    assert entry["verdict"] == "suspicious" and entry["target"] == 2
    assert entry["detectors"]["classifier"]["threshold"] == pytest.approx(0.01)  # one detector: the whole fpr
    r = invoke("scan", path)
    assert "detector mmbd not applied: skipped: torch not installed" in r.stdout


def test_unverified_still_fails_closed_by_default(tmp_path: Path) -> None:
    """No classifier layer and a spatial output: the classifier detector cannot read it and MM-BD fails on it (no
    2-D logits), so the default scan calls it unverified and --fail-on suspicious exits 6."""
    path = save(no_classifier(), tmp_path / "m.onnx")
    entry = scan(path)
    assert entry["verdict"] == "unverified" and entry["p_value"] is None and entry["detectors"] == {}
    assert set(entry["detectors_skipped"]) == {"classifier", "mmbd"}
    r = invoke("scan", path, "--fail-on", "suspicious", "-q")
    assert r.exit_code == EXIT_UNVERIFIED


def test_unverified_without_torch_fails_closed(no_torch: None, tmp_path: Path) -> None:
    path = save(conv_head(3), tmp_path / "m.onnx")  # MM-BD would read it, but it is skipped
    entry = scan(path)
    assert entry["verdict"] == "unverified"
    assert entry["detectors_skipped"]["mmbd"].startswith("skipped:")
    assert invoke("scan", path, "--fail-on", "suspicious", "-q").exit_code == EXIT_UNVERIFIED


def test_mmbd_does_not_examine_a_model_with_few_classes(tmp_path: Path) -> None:
    """Five classes: MM-BD's Gamma null over four margins is not trusted (onnxclp.detect.mmbd.MIN_CLASSES); the
    detector says why and the verdict rests on the classifier detector (the Šidák split over one detector)."""
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    from builders import init, model
    from onnx import helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 16))
    w[4] += 3.0  # a poisoned-label shortcut to class 4
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], name="fc", transB=1),
    ]
    inits = [init("W1", rng.normal(size=(16, 3, 3, 3))), init("Wf", w), init("Bf", np.zeros(5))]
    entry = scan(save(model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 5])], inits), tmp_path / "m.onnx"))
    assert entry["detectors_skipped"]["mmbd"].startswith("skipped: 5 classes; MM-BD's Gamma null needs at least 10")
    assert set(entry["detectors"]) == {"classifier"}
    assert entry["detectors"]["classifier"]["threshold"] == pytest.approx(0.01)
