"""onnxclp.study: sweep, calibration, TAC and plots on a hand-built backdoored model whose numbers are known.

The model (3x8x8 images, 3 classes; class c = the brightest colour channel c):
    x -> Conv 1x1 (16 channels) -> Relu -> GlobalAveragePool -> Flatten -> Gemm (3 classes)
- channels 0..2: 4 * x_c (the clean features; score 4);
- channel 3, the backdoor: 10 * (x_0 + x_1 + x_2) - 20, silent on clean pixels (sum < 2) and 10 on the pixels of a
  white 3x3 BadNets patch (sum 3); it adds 5 * (90 / 64) to the logit of class 0 (score 10 * sqrt(3));
- channels 4..15: small fillers (score 0.3), read by no class.
So CLP flags the backdoor channel for u below its z-score (about 3.5), and the clean channels for u below theirs
(about 0.45). Everything here is computed from those weights; nothing needs ../shared or the zoo.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

K = 16


def _weights() -> tuple[np.ndarray, np.ndarray]:
    w = np.zeros((K, 3, 1, 1), np.float32)
    b = np.zeros(K, np.float32)
    for c in range(3):
        w[c, c] = 4.0
    w[3, :] = 10.0
    b[3] = -20.0
    rng = np.random.default_rng(0)
    for k in range(4, K):
        v = rng.normal(size=3)
        w[k, :, 0, 0] = 0.3 * v / np.linalg.norm(v)
    return w, b


def backdoored_model() -> onnx.ModelProto:
    w, b = _weights()
    fc = np.zeros((3, K), np.float32)
    fc[0, 0] = fc[1, 1] = fc[2, 2] = 1.0
    fc[0, 3] = 5.0
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["conv"], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "FC", "FB"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(fc, "FC"),
        numpy_helper.from_array(np.zeros(3, np.float32), "FB"),
    ]
    g = helper.make_graph(
        nodes,
        "backdoored",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def images(n: int = 90, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images: colour channel y bright (~0.6), the others dim (~0.1)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.uniform(0.0, 0.2, size=(n, 8, 8, 3))
    x[np.arange(n), :, :, y] = rng.uniform(0.5, 0.7, size=(n, 8, 8))
    return (x * 255).round().astype(np.uint8), y.astype(np.int64)


def _z(scores: np.ndarray) -> np.ndarray:
    return (scores - scores.mean()) / scores.std(ddof=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    onnx.save(backdoored_model(), str(root / "m.onnx"))
    x, y = images()
    np.savez(root / "data.npz", x_test=x, y_test=y)
    (root / "attack.json").write_text(json.dumps({"attack": "badnets", "target": 0, "params": {"size": 3}}))
    return root


@pytest.fixture(scope="module")
def prepared(files):
    from onnxclp.study.measure import prepare

    return prepare(files / "m.onnx", files / "data.npz", attack_config=files / "attack.json")


def test_scores_of_the_model_are_as_designed():
    import onnxclp

    report = onnxclp.scan(backdoored_model(), "clp", u=3.0)
    (layer,) = [lr for lr in report.layers if lr.node == "conv"]
    s = np.asarray(layer.scores)
    assert np.allclose(s[:3], 4.0) and np.isclose(s[3], 10 * np.sqrt(3)) and np.allclose(s[4:], 0.3, atol=1e-6)
    assert layer.pruned == [3]


def test_sweep_asr_falls_once_u_is_below_the_backdoor_z(files, prepared):
    from onnxclp.study.sweep import parse_grid, sweep

    z = _z(np.array([4.0] * 3 + [10 * np.sqrt(3)] + [0.3] * 12))
    assert 3.4 < z[3] < 3.6 and 0.4 < z[0] < 0.5
    result = sweep(files / "m.onnx", prepared, parse_grid("0.25:4:0.25"), "clp")
    assert result.baseline_acc == 1.0 and result.baseline_asr == 1.0
    assert prepared.n_attacked == 60  # 90 images, the 30 of the target class are not triggered
    by_u = {p.u: p for p in result.points}
    assert len(by_u) == 16
    for u, p in by_u.items():
        if u > z[3]:  # nothing flagged: the model is unchanged
            assert (p.pruned, p.acc, p.asr) == (0, 1.0, 1.0)
        elif u > z[0]:  # only the backdoor channel
            assert p.pruned == 1 and p.acc == 1.0 and p.asr == 0.0
            assert p.pruned_fraction == pytest.approx(1 / K)
        else:  # the clean channels go too
            assert p.pruned == 4 and p.acc < 0.5
    rows = result.table()
    assert rows[0][:3] == ["u", "ACC %", "ASR %"] and rows[1][:3] == ["before", "100.00", "100.00"]


def test_sweep_settings_varies_lpp_parameters(files, prepared):
    from onnxclp.study.sweep import sweep_settings

    result = sweep_settings(
        files / "m.onnx", prepared, [{"u": 3.0, "bias_rate": b} for b in (0.0, 1.5)], "lpp", fixed={"u_low": -3.0}
    )
    assert [p.settings["bias_rate"] for p in result.points] == [0.0, 1.5]
    assert all(p.asr == 0.0 and p.acc == 1.0 for p in result.points)
    assert result.table()[0][0] == "bias_rate"


def test_choose_u_is_the_smallest_u_with_every_larger_one_within_budget():
    from onnxclp.study.calibrate import choose_u

    accs = {4.0: 0.90, 3.0: 0.895, 2.0: 0.892, 1.0: 0.85, 0.5: 0.899}
    assert choose_u(accs, 0.90, 1.0) == 2.0  # 1.0 drops 5 points; 0.5 is never reached
    assert choose_u(accs, 0.90, 0.5) == 3.0
    assert choose_u(accs, 0.90, 10.0) == 0.5
    assert choose_u({4.0: 0.5}, 0.9, 1.0) is None


def test_calibrate_picks_the_smallest_grid_u_that_keeps_the_clean_channels(files):
    from onnxclp.study.calibrate import calibrate
    from onnxclp.study.measure import prepare

    clean = prepare(files / "m.onnx", files / "data.npz")  # no attack: clean images only
    assert not clean.has_attack
    result = calibrate(files / "m.onnx", clean, "clp", max_acc_drop=1.0, grid=[0.25, 0.5, 1.0, 2.0, 3.0, 4.0])
    # z of the clean channels is about 0.45: u = 0.25 prunes them (ACC 1 -> 1/3), u = 0.5 does not.
    assert result.u == 0.5 and result.acc_before == 1.0 and result.acc_after == 1.0
    assert [t["u"] for t in result.tried] == [4.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    assert result.tried[-1]["within"] is False and result.tried[-1]["drop"] > 50


def test_tac_equals_the_hand_computed_value(files, prepared):
    from onnxclp.study.tac import spearman, tac

    result = tac(files / "m.onnx", prepared, "clp", u=3.0)
    conv = next(layer for layer in result.layers if layer.node == "conv")
    # By hand: conv output before Relu is W x + B; the trigger sets the bottom-right 3x3 pixels to 1, so
    # F_k(x) - F_k(trigger(x)) = sum_c W[k, c] (x_c - 1) on those 9 pixels and 0 elsewhere (the bias cancels).
    x, y = images()
    x = x[y != 0].astype(np.float64) / 255  # the attacked subset
    d = x[:, 5:, 5:, :] - 1.0  # (n, 3, 3, C)
    w, _ = _weights()
    change = np.einsum("nhwc,kc->nkhw", d, w[:, :, 0, 0].astype(np.float64))
    expected = np.sqrt((change**2).sum(axis=(2, 3))).mean(axis=0)
    assert result.n_images == 60
    np.testing.assert_allclose(conv.tac, expected, rtol=1e-5)
    assert int(np.argmax(conv.tac)) == 3 and conv.top()["pruned"] and conv.top()["score_z"] > 3
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    summary = result.summary(n=1)
    assert summary["strongest"][0]["node"] == "conv" and summary["strongest"][0]["channel"] == 3


def test_feature_change_uses_the_channel_axis():
    from onnxclp.study.tac import feature_change

    a = np.zeros((2, 3, 4))  # MatMul output (batch, tokens, channels): channels last
    b = np.zeros((2, 3, 4))
    b[:, :, 1] = 2.0  # channel 1 changes by 2 on 3 tokens: norm 2 * sqrt(3)
    out = feature_change(a, b, -1)
    assert out.shape == (2, 4)
    np.testing.assert_allclose(out[:, 1], 2 * np.sqrt(3))
    assert out[:, [0, 2, 3]].max() == 0


def test_sweep_of_a_model_with_external_data_runs_in_memory(tmp_path, prepared):
    from onnxclp.study.measure import load_inline
    from onnxclp.study.sweep import sweep

    path = tmp_path / "ext.onnx"
    onnx.save(backdoored_model(), str(path), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    proto = load_inline(path)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    result = sweep(path, prepared, [3.0], "clp")
    assert (result.points[0].acc, result.points[0].asr) == (1.0, 0.0)


class _Run:
    def __init__(self, result) -> None:
        self.returncode = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.output  # stdout and stderr together: enough for the messages checked here


def _cli(*args):
    """The real app, in process (no interpreter start and torch import per call)."""
    from typer.testing import CliRunner

    from onnxclp.cli import app

    return _Run(CliRunner().invoke(app, [str(a) for a in args]))


def _png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_writes_table_json_and_plot(files, tmp_path):
    r = _cli(
        "sweep", files / "m.onnx", "--data", files / "data.npz", "--attack-config", files / "attack.json",
        "--u", "1,3,4", "--plot", tmp_path / "s.png", "--json", tmp_path / "s.json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "before" in r.stdout and _png(tmp_path / "s.png")
    points = json.loads((tmp_path / "s.json").read_text())["points"]
    assert [(p["settings"]["u"], p["asr"]) for p in points] == [(1.0, 0.0), (3.0, 0.0), (4.0, 1.0)]


def test_cli_tac_and_scan_plots(files, tmp_path):
    r = _cli(
        "tac", files / "m.onnx", "--data", files / "data.npz", "--attack-config", files / "attack.json",
        "--json", tmp_path / "t.json", "--plot", tmp_path / "t.png",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "highest-TAC channel pruned in 1 of 1 layers" in r.stdout
    assert _png(tmp_path / "t.png")
    assert json.loads((tmp_path / "t.json").read_text())["layers"][0]["top"]["channel"] == 3
    r = _cli("scan", files / "m.onnx", "-q", "--plot", tmp_path / "plots")
    assert r.returncode == 0, r.stderr
    assert _png(tmp_path / "plots" / "scores.png")


def _data200(files: Path) -> Path:
    """200 clean images: the guard keeps 100 for validation and tunes on the other 100."""
    path = files / "data200.npz"
    if not path.exists():
        x, y = images(200, seed=2)
        np.savez(path, x_test=x, y_test=y)
    return path


def test_cli_sanitize_calibrate_is_the_guards_tuning(files, tmp_path):
    """Issue 18.1: --calibrate DATA is --clean-data DATA; u is tuned on the fit part (the strongest within the
    budget), the validation part checks the result; a --u the user gives is kept; nothing within budget keeps
    the default."""
    out, data = tmp_path / "clean.onnx", _data200(files)
    r = _cli(
        "sanitize", files / "m.onnx", out, "--calibrate", data, "--calibrate-grid", "0.25,0.5,1,3",
        "--report", tmp_path / "r.json", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tuned on the 100 fit images" in r.stderr and "u=0.5" in r.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["params"]["u"] == 0.5
    tuned = report["guard"]["tuned"]
    assert tuned["parameters"] == {"u": 0.5} and [t["u"] for t in tuned["tried"]] == [3.0, 1.0, 0.5, 0.25]
    assert tuned["tried"][-1]["within"] is False and report["guard"]["accepted"] is True
    r = _cli("sanitize", files / "m.onnx", out, "--clean-data", data, "--u", "3", "--report", tmp_path / "r2.json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["params"]["u"] == 3.0 and report["guard"]["tuned"] is None
    r = _cli("sanitize", files / "m.onnx", out, "--force", "--clean-data", data, "--calibrate-grid", "0.1")
    assert r.returncode == 0 and "even u=0.1" in r.stderr and "defaults are kept" in r.stderr
    r = _cli("sanitize", files / "m.onnx", out, "--calibrate", data, "--clean-data", data)
    assert r.returncode == 2 and "give one of them" in r.stderr


def test_plain_sanitize_and_scan_import_no_torch_onnxruntime_or_matplotlib(files, tmp_path):
    """Plain sanitize and scan both succeed (exit 0, their outputs written) without torch, onnxruntime or
    matplotlib: the study tools are imported only when their options are used."""
    out, rep = tmp_path / "o.onnx", tmp_path / "scan.json"
    code = (
        "import json, sys; from onnxclp.cli import app\n"
        "codes = []\n"
        f"for argv in (['sanitize', {str(files / 'm.onnx')!r}, {str(out)!r}, '-q'],"
        f" ['scan', {str(files / 'm.onnx')!r}, '--fail-on', 'never', '--json', {str(rep)!r}, '-q',"
        " '--detector', 'classifier']):\n"  # the weight-only gate (the default adds MM-BD, which needs torch)
        "    try:\n        app(argv)\n        codes.append(0)\n"
        "    except SystemExit as exc:\n        codes.append(exc.code or 0)\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'matplotlib') if m in sys.modules)\n"
        "print(json.dumps({'exit': codes, 'heavy': heavy}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"exit": [0, 0], "heavy": []}, r.stdout + r.stderr
    assert onnx.load(str(out)).graph.node, "sanitize wrote no model"
    assert json.loads(rep.read_text())[0]["report"]["layers"], "scan wrote no report"


def test_cli_calibrate_lpp_tunes_u_low_and_bias_rate_least_invasive_first(files, tmp_path):
    """Issue 15.10: LPP's lower threshold and rescale band cost accuracy at any u, so the tuning starts from
    their least invasive values (u_low -1000: nothing pruned below; bias rate 0: nothing rescaled), chooses u,
    then walks each towards the more invasive values while the budget holds, and says which setting it chose."""
    out, data = tmp_path / "clean.onnx", _data200(files)
    r = _cli(
        "sanitize", files / "m.onnx", out, "--method", "lpp", "--clean-data", data,
        "--calibrate-grid", "0.5,1,3", "--report", tmp_path / "r.json", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("tuned on the "))
    assert "u_low=" in line and "bias_rate=" in line  # each tuned parameter is reported with its drop
    params = json.loads((tmp_path / "r.json").read_text())["params"]
    assert params["method"] == "lpp" and params["u_low"] in (-1000.0, -5.0, -4.0, -3.0)
    assert params["bias_rate"] in (0.0, 0.5, 1.0) and params["u"] in (0.5, 1.0, 3.0)
    # a value the user gives is kept as given, not tuned
    r = _cli(
        "sanitize", files / "m.onnx", out, "--method", "lpp", "--clean-data", data,
        "--calibrate-grid", "0.5,1,3", "--u-low", "-2", "--report", tmp_path / "r2.json", "-q",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["params"]["u_low"] == -2.0 and "u_low" not in report["guard"]["tuned"]["parameters"]


def _held_out_disagree(fractions: tuple[float, float | None]) -> Path:
    """300 images whose fit part (under the split of ``fractions``: validation, selection) holds class 0 only and
    whose held-out parts hold classes 1 and 2."""
    from onnxclp.guard import split_parts

    fit, _, _ = split_parts(300, *fractions)
    y = 1 + np.arange(300) % 2
    y[fit] = 0
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.2, size=(300, 8, 8, 3))
    x[np.arange(300), :, :, y] = rng.uniform(0.5, 0.7, size=(300, 8, 8))
    path = Path(tempfile.mkdtemp()) / "d.npz"
    np.savez(path, x_test=(x * 255).round().astype(np.uint8), y_test=y)
    return path


def test_tuning_steps_back_when_the_selection_part_disagrees():
    """With a selection part (sessions 6-13's split): the fit part holds class 0 only and the selection and
    validation parts classes 1 and 2: u = 0.25 (every channel pruned, the model answers 0) is within budget on the
    fit images and 100 points over on the selection part, so the tuning steps back to u = 3, and the guard
    accepts that on the validation part, which chose nothing. By default (no selection part) the same two
    candidates are tested on the validation part weakest first: u = 3 passes, u = 0.25 fails, u = 3 is kept."""
    import onnxclp

    path = _held_out_disagree((0.2, 0.2))
    ctx = {"clean_data": path, "clean_n": 300, "u_grid": [0.25, 3], "quiet": True, "val_fraction": 0.2,
           "select_fraction": 0.2}  # fmt: skip
    _, rep = onnxclp.sanitize(backdoored_model(), "clp", context=ctx, force=True)
    tuned = rep.guard["tuned"]
    assert [t["within"] for t in tuned["tried"]] == [True, True]  # both within on the fit images
    assert [(s["u"], s["within"]) for s in tuned["stepped_back"]] == [(0.25, False), (3.0, True)]
    assert rep.params["u"] == 3.0 and rep.guard["accepted"] and not rep.guard["selected_on_validation"]

    ctx = {"clean_data": _held_out_disagree((0.4, None)), "clean_n": 300, "u_grid": [0.25, 3], "quiet": True}
    _, rep = onnxclp.sanitize(backdoored_model(), "clp", context=ctx, force=True)
    back = rep.guard["tuned"]["stepped_back"]
    assert [(s["u"], s["within"], s["in_sequence"]) for s in back] == [(3.0, True, True), (0.25, False, True)]
    assert rep.params["u"] == 3.0 and rep.guard["accepted"] and rep.guard["tested_in_sequence"]
