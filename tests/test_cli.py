"""The command line: exit codes, messages, reports (README, "Exit codes")."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import cli_heavy_imports, conv_bn, model
from onnx import helper


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "onnxclp.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.fixture
def suspicious(tmp_path):
    w = np.random.default_rng(0).normal(size=(16, 3, 3, 3)).astype(np.float32)
    w[5] *= 10
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(w, gamma=np.ones(16)), str(path))
    return path


def test_sanitize_writes_model_and_report(suspicious, tmp_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    r = _cli("sanitize", suspicious, out, "--report", rep)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    data = json.loads(rep.read_text())
    assert data["layers"][0]["pruned"] == [5]
    assert data["totals"]["pruned_channels"] == 1
    assert data["layers"][0]["affine"] == "bn" and data["layers"][0]["weight"] == "W"
    assert "conv" in r.stdout and "1 of 16 channels pruned" in r.stdout


def test_scan_fail_on_outliers(suspicious, tmp_path):
    r = _cli("scan", suspicious, "--fail-on-outliers", "--json", tmp_path / "s.json")
    assert r.returncode == 1
    assert json.loads((tmp_path / "s.json").read_text())[0]["report"]["layers"][0]["pruned"] == [5]
    assert _cli("scan", suspicious, "--fail-on-outliers", "--u", "50").returncode == 0
    assert not list(tmp_path.glob("*.onnx.*"))


def test_refuses_to_overwrite_input_without_force(suspicious):
    before = suspicious.read_bytes()
    r = _cli("sanitize", suspicious, suspicious)
    assert r.returncode == 2 and "--force" in r.stderr
    assert suspicious.read_bytes() == before
    assert _cli("sanitize", suspicious, suspicious, "--force").returncode == 0
    assert suspicious.read_bytes() != before


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"", "empty file"), (b"\x08\x07garbage\xff\xff\xff", "not a valid ONNX model")],
)
def test_bad_input_is_one_line_exit_2(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    r = _cli("sanitize", path, tmp_path / "out.onnx")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_usage_errors_exit_2(suspicious, tmp_path):
    assert _cli("sanitize", suspicious, tmp_path / "o.onnx", "--method", "nope").returncode == 2
    r = _cli("sanitize", suspicious, tmp_path / "o.onnx", "--topk", "3")
    assert r.returncode == 2 and "lpp" in r.stderr
    r = _cli("sanitize", suspicious, tmp_path / "o.onnx", "--exclude", "(")
    assert r.returncode == 2 and "regular expression" in r.stderr
    assert _cli("sanitize", suspicious).returncode == 2  # missing OUTPUT
    r = _cli("sanitize", suspicious, tmp_path / "missing_dir" / "o.onnx")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_nothing_to_sanitize_exit_3(tmp_path):
    path = tmp_path / "relu.onnx"
    onnx.save(model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 3])], [("y", [1, 3])]), str(path))
    r = _cli("sanitize", path, tmp_path / "o.onnx")
    assert r.returncode == 3 and "no layer can be scored" in r.stderr
    assert not (tmp_path / "o.onnx").exists()
    # scan: nothing for a detector to read is an unverified model (fails closed under the gate), not an error
    r = _cli("scan", path)
    assert r.returncode == 0 and "1 unverified" in r.stdout + r.stderr
    assert _cli("scan", path, "--fail-on", "suspicious").returncode == 6


def test_lpp_and_exact_from_cli(suspicious, tmp_path):
    r = _cli("scan", suspicious, "--method", "lpp", "--score", "exact", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    layer = json.loads((tmp_path / "r.json").read_text())[0]["report"]["layers"][0]
    assert layer["score"] == "exact" and 5 in layer["pruned"]


def test_sanitize_path_does_not_import_torch_or_onnxruntime(suspicious, tmp_path):
    """The sanitize command succeeds (exit 0, a sanitized model written) without importing torch or onnxruntime."""
    out = tmp_path / "o.onnx"
    assert cli_heavy_imports(["sanitize", suspicious, out, "-q"]) == {"exit": 0, "heavy": []}
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["onnxclp.method"] == "clp" and meta["onnxclp.pruned_channels"] == "1"


def test_risky_u_needs_force_and_is_reported(suspicious, tmp_path):
    """Issue 15.3: u below 1 prunes most channels of a layer: refused (exit 2, nothing written) unless --force,
    and then the report and the terminal say so."""
    out = tmp_path / "o.onnx"
    for u in ("0", "-1", "0.5"):
        r = _cli("sanitize", suspicious, out, "--u", u)
        assert r.returncode == 2 and "--force" in r.stderr and not out.exists()
    r = _cli("scan", suspicious, "--u", "0")
    assert r.returncode == 2 and "--force" in r.stderr
    r = _cli("sanitize", suspicious, out, "--u", "0.5", "--force", "--report", tmp_path / "r.json")
    assert r.returncode == 0 and "WARNING" in r.stderr
    assert any("WARNING" in n for n in json.loads((tmp_path / "r.json").read_text())["notes"])


def test_bad_output_paths_are_refused_before_any_work(suspicious, tmp_path):
    """Issue 15.5: a report in a folder that does not exist is refused first: no model written, exit 2."""
    out = tmp_path / "o.onnx"
    r = _cli("sanitize", suspicious, out, "--report", tmp_path / "nodir" / "r.json")
    assert r.returncode == 2 and "does not exist" in r.stderr and not out.exists()
    r = _cli("sanitize", suspicious, tmp_path / "nodir" / "o.onnx")
    assert r.returncode == 2 and not (tmp_path / "nodir").exists()
    r = _cli("scan", suspicious, "--format", "json", "--output", tmp_path / "nodir" / "s.json")
    assert r.returncode == 2 and "does not exist" in r.stderr
