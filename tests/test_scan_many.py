"""``onnxclp scan PATH...``: many models in one call, the JSON list, exit codes, error entries, formats, and the
same JSON from one worker, two worker processes and a local Ray instance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnxclp.cli import app

GOLDEN = Path(__file__).parent / "golden"


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """A folder of real exports (both torch exporters, tf2onnx, QDQ), one of them in a subfolder."""
    (tmp_path / "sub").mkdir()
    for name in ("resnet.torchscript.onnx", "vgg.torchscript.onnx", "keras_cnn.onnx", "qdq.onnx"):
        shutil.copy(GOLDEN / name, tmp_path / name)
    shutil.copy(GOLDEN / "resnet.dynamo.onnx", tmp_path / "sub" / "resnet.dynamo.onnx")
    shutil.copy(GOLDEN / "resnet.dynamo.onnx.data", tmp_path / "sub" / "resnet.dynamo.onnx.data")
    return tmp_path


def test_folder_scan_json_list(models: Path) -> None:
    r = invoke("scan", models, "--format", "json", "--output", "-", "--detector", "classifier")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert [Path(e["path"]).name for e in out] == [
        "keras_cnn.onnx", "qdq.onnx", "resnet.torchscript.onnx", "resnet.dynamo.onnx", "vgg.torchscript.onnx",
    ]  # fmt: skip
    for e in out:
        # qdq.onnx has no classifier layer (a Conv feeds the output): no detector can examine it
        assert (
            e["verdict"] == "unverified" if e["path"].endswith("qdq.onnx") else e["verdict"] in ("clean", "suspicious")
        )
        assert e["target"] is None or isinstance(e["target"], int)
        assert set(e["detectors"]) | set(e["detectors_skipped"]) == {"classifier"}  # the weight-only gate
        for d in e["detectors"].values():
            assert 0.0 <= d["p_value"] <= 1.0 and d["threshold"] == pytest.approx(0.01 / len(e["detectors"]))
        assert e["report"]["layers"] and e["error"] is None


def test_unreadable_model_is_an_error_entry_and_the_worst_exit_code(models: Path) -> None:
    (models / "broken.onnx").write_bytes(b"\x08\x07garbage")
    r = invoke("scan", models / "broken.onnx", models / "qdq.onnx", models / "missing.onnx", "--format", "json")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert [e["verdict"] for e in out][0::2] == ["error", "error"]  # broken, then the missing path (listed last)
    assert out[1]["verdict"] == "unverified" and out[1]["report"]["layers"]  # qdq.onnx: no classifier layer
    assert out[0]["error"] and out[0]["report"] is None
    assert sum(line.startswith("error: ") for line in r.stderr.splitlines()) == 2


def test_glob_and_fail_on(models: Path) -> None:
    r = invoke("scan", str(models / "*.onnx"), "--fail-on", "outliers", "-q", "--detector", "classifier")
    assert r.exit_code == 1  # the golden models have planted outlier channels
    assert len(r.stdout.strip().splitlines()) == 5  # one line per model with -q, then the tally
    assert r.stdout.strip().splitlines()[-1].startswith("4 models: ")
    r = invoke("scan", str(models / "qdq.onnx"), "--fail-on", "never", "-q")
    assert r.exit_code == 0


def test_text_output_is_never_truncated(models: Path) -> None:
    r = invoke("scan", models / "resnet.torchscript.onnx", "--verbose")
    assert r.exit_code == 0
    assert "/layer3/conv2/Conv" in r.stdout or "layer3" in r.stdout
    assert "…" not in r.stdout


def test_sarif_output_validates(models: Path, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out = tmp_path / "scan.sarif"
    r = invoke("scan", models, "--format", "sarif", "--output", out, "--detector", "classifier")
    assert r.exit_code == 0, r.stderr
    schema = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())
    log = json.loads(out.read_text())
    jsonschema.validate(log, schema)
    assert log["runs"][0]["tool"]["driver"]["name"] == "onnxclp"


def test_workers_give_the_same_json(models: Path) -> None:
    one = invoke("scan", models, "--format", "json", "--workers", "1", "--detector", "classifier")
    two = invoke("scan", models, "--format", "json", "--workers", "2", "--detector", "classifier")
    assert one.exit_code == two.exit_code == 0
    assert one.stdout == two.stdout


def test_ray_local_gives_the_same_json(models: Path) -> None:
    ray = pytest.importorskip("ray")
    one = invoke("scan", models, "--format", "json", "--output", "-", "--workers", "1", "--detector", "classifier")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = invoke(
            "scan", models, "--format", "json", "--output", "-", "--ray", "local", "--detector", "classifier"
        )
    finally:
        ray.shutdown()
    assert on_ray.exit_code == 0, on_ray.stderr
    assert json.loads(on_ray.stdout) == json.loads(one.stdout)
