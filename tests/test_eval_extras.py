"""Every command and option that needs an optional extra says which one, in one line, exit 2 (issue 15.2).

The CLI runs in a subprocess whose ``sitecustomize`` hides modules from the import system (every finder on
``sys.meta_path`` answers "not found" for them), as in an environment where the ``eval`` extra is not installed:
``import torch`` raises ModuleNotFoundError and ``importlib.util.find_spec("torch")`` is None. A check in a real
venv without the extra (pip install -e . --no-deps plus onnx numpy typer rich) is recorded in docs/evaluate.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from builders import conv_bn

BLOCKER = textwrap.dedent(
    """
    import os
    import sys

    _BLOCKED = set(os.environ.get("ONNXCLP_TEST_HIDE", "").split(","))


    class _Hide:
        def __init__(self, finder):
            self._finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCKED:
                return None
            find = getattr(self._finder, "find_spec", None)
            return None if find is None else find(name, path, target)

        def __getattr__(self, attr):
            return getattr(self._finder, attr)


    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
    """
)

EVAL_MODULES = "torch,onnxruntime,matplotlib,PIL,torchvision"


@pytest.fixture
def env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)

    def make(hidden: str) -> dict[str, str]:
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [e.get("PYTHONPATH")])])
        e["ONNXCLP_TEST_HIDE"] = hidden
        return e

    return make


@pytest.fixture
def model_file(tmp_path):
    w = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn(w, gamma=np.ones(8)), str(path))
    return path


def _cli(env, *args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "onnxclp", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_the_blocker_hides_the_modules(env, tmp_path):
    code = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('onnxruntime'), u.find_spec('numpy') is not None)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(EVAL_MODULES), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None", "True"]


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "{model}", "--data", "d.npz"],
        ["evaluate", "{model}", "--data", "d.npz", "--attack", "wanet", "--device", "CUDA"],
        ["compare", "{model}", "{model}", "--data", "d.npz"],
        ["sweep", "{model}", "--data", "d.npz"],
        ["tac", "{model}", "--data", "d.npz", "--attack", "badnets"],
        ["sanitize", "{model}", "out.onnx", "--calibrate", "d.npz"],
        ["scan", "{model}", "--plot", "plots"],
    ],
    ids=["evaluate", "evaluate-cuda", "compare", "sweep", "tac", "sanitize-calibrate", "scan-plot"],
)
def test_a_missing_eval_extra_is_one_line_exit_2(env, model_file, tmp_path, args):
    r = _cli(env(EVAL_MODULES), *[a.format(model=model_file) for a in args], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1, r.stderr
    extra = "plot" if "--plot" in args and args[0] == "scan" else "eval"  # scan --plot needs matplotlib alone
    assert f"'{extra}' extra" in lines[0] and f"pip install 'onnxclp[{extra}]'" in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["scan", "{model}", "--plot", "plots"],
        ["sweep", "{model}", "--data", "d.npz", "--plot", "s.png"],
        ["tac", "{model}", "--data", "d.npz", "--attack", "badnets", "--plot", "t.png"],
    ],
    ids=["scan", "sweep", "tac"],
)
def test_plots_without_matplotlib_name_the_extra(env, model_file, tmp_path, args):
    np.savez(tmp_path / "d.npz", x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.zeros(4, np.int64))
    r = _cli(env("matplotlib"), *[a.format(model=model_file) for a in args], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    extra = "plot" if args[0] == "scan" else "eval"
    assert len(lines) == 1 and f"'{extra}' extra (matplotlib not installed)" in lines[0], r.stderr


def test_sanitize_and_scan_run_without_the_extra(env, model_file, tmp_path):
    e = env(EVAL_MODULES)
    r = _cli(e, "sanitize", model_file, "out.onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.onnx").exists()
    r = _cli(e, "scan", model_file, cwd=tmp_path)
    assert r.returncode in (0, 1), r.stderr  # 1: outliers found (the README's exit codes)
