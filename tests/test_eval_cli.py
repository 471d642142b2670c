"""The evaluate/compare commands: one-line errors with exit code 2, JSON output, options, cheap import."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from onnxclp.cli.eval import register

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A 4-class model taking 3×8×8 (dynamic batch) and a few data files, good and bad."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    torch.onnx.export(
        net.eval(), torch.zeros(1, 3, 8, 8), str(root / "m.onnx"), input_names=["x"], output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "ok.npz", x_test=x, y_test=np.arange(12) % 4)
    np.savez(root / "labels.npz", x_test=x, y_test=np.arange(12) % 6)
    np.savez(root / "big.npz", x_test=rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8), y_test=np.arange(12) % 4)
    np.savez(root / "grey.npz", x_test=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y_test=np.arange(12) % 4)
    return root


def run(app: typer.Typer, *args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        ("ok.npz", ["--x-key", "images"], "error: .*ok.npz: no array 'images' \\(it has: x_test, y_test\\)"),
        ("labels.npz", [], "error: labels go up to 5 but the model has 4 outputs"),
        ("big.npz", [], "error: images are 10×10 but the model takes 8×8; pass --input-size 8,8"),
        ("grey.npz", [], "error: images have 1 channel\\(s\\) but the model takes 3"),
        ("missing.npz", [], "error: no such data file or folder"),
        ("ok.npz", ["--attack", "sig", "--alpha", "0.3"], "error: --alpha does not apply to the sig attack"),
        ("ok.npz", ["--target", "7", "--attack", "badnets"], "error: --target 7 is not a class of a 4-class model"),
        ("ok.npz", ["--mean", "0.5,0.5,0.5"], "error: --mean and --std go together"),
        ("ok.npz", ["--mean", "0.5,0.5", "--std", "1,1"], "error: --mean has 2 values for 3-channel images"),
        ("ok.npz", ["--input-size", "8"], "error: --input-size: expected H,W"),
        ("ok.npz", ["--attack", "badnets", "--patch-size", "9"], "error: badnets: a 9×9 patch .* does not fit"),
        ("ok.npz", ["--attack", "wanet", "--grid", "nope.npy"], "error: wanet: params.grid: no such file"),
        ("ok.npz", ["--attack-config", "nope.json"], "error: cannot read attack config nope.json"),
        ("ok.npz", ["--param", "size"], "error: --param: expected KEY=VALUE"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(app, files, data: str, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(app, "evaluate", files / "m.onnx", "--data", files / data, *extra)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(message, lines[0]), lines[0]
    assert "Traceback" not in err


def test_usage_errors_exit_2(app, files) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(app, "evaluate", files / "m.onnx", "--data", files / "ok.npz", "--attack", "trojan")
    assert code == 2 and "trojan" in err
    code, _, _ = run(app, "evaluate", files / "m.onnx")  # --data is required
    assert code == 2


def test_missing_model_and_debug_traceback(app, files) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(app, "evaluate", files / "none.onnx", "--data", files / "ok.npz")
    assert code == 2 and err.startswith("error: no such model file")
    result = CliRunner().invoke(app, ["evaluate", str(files / "none.onnx"), "--data", str(files / "ok.npz"), "--debug"])
    # One error policy for every command: --debug adds the traceback, the exit code stays 2.
    assert result.exit_code == 2 and "Traceback" in result.output and "OnnxclpError" in result.output


def test_device_cuda_without_cuda_is_one_line(app, files, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for device in ("cuda", "CUDA"):  # the one device rule: case-insensitive, never a silent CPU run
        code, _, err = run(app, "evaluate", files / "m.onnx", "--data", files / "ok.npz", "--device", device)
        assert code == 2
        assert err.strip() == (
            "error: --device cuda: this onnxruntime has no CUDAExecutionProvider (available: CPUExecutionProvider); "
            "install the 'eval-gpu' extra (onnxruntime-gpu) instead of 'eval': pip uninstall -y onnxruntime && "
            "pip install 'onnxclp[eval-gpu]'"
        )


def test_json_to_stdout_resize_limit_and_trigger_options(app, files) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(
        app, "evaluate", files / "m.onnx", "--data", files / "big.npz", "--input-size", "8,8", "--limit", "5",
        "--attack", "badnets", "--patch-size", "2", "--position", "-3,-3", "--value", "1,0,0", "--mode", "a2a",
        "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json", "-",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["n_samples"] == 5 and report["n_attacked"] == 5  # a2a: every sample is attacked
    assert report["attack"] == {
        "attack": "badnets",
        "target": 0,
        "mode": "a2a",
        "seed": 0,
        "params": {"size": 2, "position": [-3, -3], "value": [1.0, 0.0, 0.0], "image": None},
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    }
    assert report["input"] == {
        "name": "x", "layout": "nchw", "dtype": "float32", "batch": None, "channels": 3, "height": 8, "width": 8,
    }  # fmt: skip
    assert 0.0 <= report["acc"] <= 1.0 and report["images"] == 10


def test_every_attack_runs_from_the_command_line(app, files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    extra = {
        "blended": ["--alpha", "0.3"],
        "sig": ["--delta", "20/255", "--frequency", "2"],
        "wanet": ["--k", "3", "--s", "0.8", "--grid-rescale", "1"],
        "bpp": ["--levels", "4"],
        "patch": ["--patch-size", "2,3", "--opacity", "0.5", "--position", "top-left"],
        "none": [],
        "badnets": ["--param", "size=1"],
    }
    for name, options in extra.items():
        code, out, err = run(
            app, "evaluate", files / "m.onnx", "--data", files / "ok.npz", "--attack", name, *options,
            "--save-examples", tmp_path, "--json", tmp_path / f"{name}.json",
        )  # fmt: skip
        assert code == 0, (name, err)
        assert "ACC" in out and "ASR" in out and "RA" in out
        report = json.loads((tmp_path / f"{name}.json").read_text())
        assert report["attack"]["attack"] == name
        assert (tmp_path / f"{name}_examples.png").is_file()
    wanet = json.loads((tmp_path / "wanet.json").read_text())["attack"]["params"]
    assert wanet == {"k": 3, "s": 0.8, "grid_rescale": 1.0, "grid": None, "grid_kind": None}
    sig = json.loads((tmp_path / "sig.json").read_text())["attack"]["params"]
    assert sig == {"delta": pytest.approx(20 / 255), "frequency": 2.0}


def test_compare_prints_both_models_and_the_change(app, files) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(
        app, "compare", files / "m.onnx", files / "m.onnx", "--data", files / "ok.npz", "--attack", "bpp"
    )
    assert code == 0, err
    assert "original" in out and "sanitized" in out and "+0.00 pt" in out
    assert "100.00% of clean predictions" in out


def test_the_main_app_has_the_commands() -> None:
    from onnxclp.cli import app

    result = CliRunner().invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--attack-config" in result.stdout


def test_importing_the_cli_module_loads_nothing_heavy() -> None:
    code = (
        "import sys, onnxclp.cli.eval\n"
        "heavy = [m for m in ('torch', 'onnxruntime', 'PIL', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
