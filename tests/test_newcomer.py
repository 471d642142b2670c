"""A newcomer's first hour (issue 22, items 1-6 and 9-11): output that fits an 80-column terminal and never cuts a
name, one note per group instead of 71, no ASR line without an attack, the normalisation a model records, help
text at COLUMNS=80, the extras each method needs, install hints, the project's URLs."""

from __future__ import annotations

import email.message
import json
import os
import re
import select
import subprocess
import sys
from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import init, model
from onnx import helper
from rich.console import Console
from typer.testing import CliRunner

from onnxclp.cli import app
from onnxclp.errors import OnnxclpError
from onnxclp.render import coupled_notes, layer_name, print_report, render_plain, report_title
from onnxclp.report import CoupledChannels, LayerReport, Report, SkippedLayer, unique_notes

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _layer(node: str, weight: str, channels: int = 32, pruned=(), rescaled=(), affine=None, role="hidden"):
    scores = np.linspace(0.1, 5.0, channels)
    return LayerReport(
        node=node, op="Conv", weight=weight, channels=channels, affine=affine, role=role, score="spectral",
        scores=list(scores), score_min=0.1, score_mean=float(scores.mean()), score_max=5.0, score_std=1.0,
        threshold=4.2, pruned=list(pruned), rescaled={k: 0.5 for k in rescaled},
    )  # fmt: skip


def _report(method: str = "lpp") -> Report:
    long = "functional_1/very_long_keras_block_name_1/separable_conv2d/depthwise_kernel_weights:0"
    rep = Report(method=method, params={"method": method, "u": 3.0, "score": "l2", "include_fc": False})
    rep.layers = [
        _layer("node_Conv_291", "layer1.0.conv1.weight", pruned=[3]),
        _layer("/layer2/layer2.0/conv2/Conv", "onnx::Conv_89", pruned=list(range(0, 32, 2)), rescaled=range(1, 30, 2)),
        _layer("Conv__42", long, pruned=[7], affine="functional_1/bnc_1/batchnorm/mul_1"),
        _layer("node_linear", "fc.weight", channels=10, role="output"),
    ]
    rep.skipped = [SkippedLayer("node_Gemm_7", "Gemm", "fully connected: not scored by LPP", "head.fc.weight")]
    return rep


def _first_column(lines: list[str]) -> str:
    """The table's first column, every line's part before the first run of two spaces, joined: a folded name
    continues on the next lines, so each name is a substring of it exactly when it is whole."""
    return "".join(line.split("  ")[0] for line in lines if line and not line.startswith(" "))


# -- 1: readable names, 80 columns, nothing cut -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "weight", "name"),
    [
        ("node_Conv_291", "layer1.0.conv1.weight", "layer1.0.conv1"),  # dynamo
        ("/layer1/layer1.0/conv1/Conv", "onnx::Conv_92", "layer1.0.conv1"),  # TorchScript, BatchNorm folded
        ("/layer2/short/short.0/Conv", "onnx::Conv_104", "layer2.short.0"),
        ("/features/features.0/Conv", "features.0.weight", "features.0"),
        ("Conv__42", "const_fold_opt__57", "Conv__42"),  # tf2onnx: nothing better
        (
            "Conv__32",
            "functional_1/conva_1/convolution/merged_input:0",
            "functional_1/conva_1/convolution/merged_input:0",
        ),
        ("conv", "W", "conv"),  # named by hand: kept
        ("Conv#3", "", "Conv#3"),
    ],
)
def test_layer_names_are_readable(node, weight, name):
    assert layer_name(node, weight) == name


def test_terminal_table_fits_80_columns_and_cuts_no_name():
    out = StringIO()
    print_report(_report(), Console(file=out, width=80, force_terminal=False, highlight=False), verbose=True)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80, out.getvalue()
    text = out.getvalue()
    assert "…" not in text and "node_Conv_291" not in text
    first = _first_column(lines)
    long = "functional_1/very_long_keras_block_name_1/separable_conv2d/depthwise_kernel_weights:0"
    for name in ("layer1.0.conv1", "layer2.0.conv2", long):  # the long one folded over lines, whole
        assert name in first, first
    assert "* scored with the per-channel affine" in text  # no room for the affine's name: a mark
    assert "head.fc" in text  # the skipped layer by its weight too
    for k in range(1, 30, 2):  # every rescaled channel (verbose lists them all), wrapped at ", "
        assert re.search(rf"(^|[ ,]){k}(,|$| )", text, re.M)


def test_affine_column_shown_when_it_fits_and_dropped_when_always_empty():
    rep = _report("clp")
    rep.layers = [
        _layer("/features/features.0/Conv", "features.0.weight", affine="/features/features.1/BatchNormalization")
    ]
    out = StringIO()
    print_report(rep, Console(file=out, width=80, highlight=False))
    assert "affine" in out.getvalue() and "features.1" in out.getvalue()
    rep.layers = [_layer("node_Conv_1", "conv1.weight")]
    out = StringIO()
    print_report(rep, Console(file=out, width=80, highlight=False))
    assert "affine" not in out.getvalue() and "conv1" in out.getvalue()


def test_plain_lines_list_every_channel():
    text = render_plain(_report(), verbose=False)
    assert "…" not in text and "(+" not in text
    assert ",".join(str(k) for k in range(0, 32, 2)) in text
    assert ",".join(str(k) for k in range(1, 30, 2)) in text
    assert "functional_1/very_long_keras_block_name_1/separable_conv2d/depthwise_kernel_weights:0" in text
    assert "skipped head.fc (Gemm): fully connected: not scored by LPP" in text


def _pty_run(args: list[str], cwd: Path) -> str:
    """Run onnxclp with stdout and stderr on an 80x24 pseudo-terminal; what it printed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "COLUMNS": "80", "LINES": "24", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "onnxclp.cli", *args], stdout=slave, stderr=slave, stdin=slave, cwd=cwd, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode()
    return ANSI.sub("", b"".join(chunks).decode().replace("\r\n", "\n"))


def test_sanitize_on_a_real_80_column_terminal(tmp_path):
    out = _pty_run(["sanitize", str(GOLDEN / "resnet.dynamo.onnx"), str(tmp_path / "o.onnx"), "--u", "1.5"], tmp_path)
    lines = [line for line in out.splitlines() if not line.startswith("wrote ")]  # a long path: the terminal wraps it
    assert max(len(line) for line in lines) <= 80, out
    assert "node_Conv" not in out and "layer2.short.0" in out and "layer1.conv1" in out
    assert "affine" not in out  # always '-' on this export (BatchNorm folded): no column
    assert "onnxclp clp (u=1.5, score=spectral)" in out


def test_sanitize_piped_is_plain_lines(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "onnxclp.cli", "sanitize", GOLDEN / "vgg.torchscript.onnx", tmp_path / "o.onnx",
         "-m", "lpp", "--include-fc", "--u", "1.5"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "─" not in r.stdout and "…" not in r.stdout
    assert re.search(r"^features\.0 +Conv +8 +features\.1 ", r.stdout, re.M), r.stdout
    assert re.search(r"^classifier\.1 .*\b4,6,8,12,17,20,22,25,31$", r.stdout, re.M), r.stdout


# -- 2: one note per group, titles with the method's own parameters ---------------------------------------------


def test_title_shows_only_the_methods_parameters():
    otbr = Report("otbr", {"method": "otbr", "ratio": 0.05, "steps": 20, "score": "", "include_fc": False})
    assert report_title(otbr) == "onnxclp otbr (ratio=0.05, steps=20)"
    clp = Report("clp", {"method": "clp", "u": 3.0, "score": "spectral", "include_fc": True})
    assert report_title(clp) == "onnxclp clp (u=3.0, score=spectral, include_fc)"


def test_coupled_channels_make_one_note_per_group():
    coupled = [CoupledChannels(k, ["node_Conv_1", "node_Conv_9"], "node_add_3") for k in range(71)]
    coupled.append(CoupledChannels(5, ["a", "b"], "add", kept="b"))
    notes = coupled_notes(coupled, {"node_Conv_1": "layer1.conv1", "node_Conv_9": "layer1.conv2"})
    assert len(notes) == 3, notes
    assert notes[0].startswith("note: channels 0, 1, 2,") and "(layer1.conv1, layer1.conv2; summed at" in notes[0]
    assert "pruned only in b (--streams strongest)" in notes[1]
    assert "Residual streams" in notes[2]
    rep = _report()
    rep.coupled = coupled
    assert render_plain(rep).count("write the same residual stream") == 2


def test_repeated_notes_are_counted():
    assert unique_notes(["a", "b", "a", "a"]) == ["a (×3)", "b"]


# -- 3, 4: evaluate without an attack, normalisation from the model's metadata ------------------------------------


def _constant_classifier(path: Path, props: dict[str, str] | None = None) -> Path:
    """4 classes, 3×4×4 images: always class 0 (ACC 25 % on balanced labels: chance)."""
    m = model(
        [
            helper.make_node("GlobalAveragePool", ["x"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "W", "b"], ["y"], transB=1),
        ],
        [("x", ["n", 3, 4, 4])],
        [("y", ["n", 4])],
        [init("W", np.zeros((4, 3), np.float32)), init("b", np.array([1, 0, 0, 0], np.float32))],
    )
    if props:
        helper.set_model_props(m, props)
    onnx.save(m, str(path))
    return path


@pytest.fixture
def eval_files(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_test=rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8), y_test=np.arange(16) % 4)
    return tmp_path


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "80"})


def test_evaluate_attack_none_prints_no_asr_and_warns_near_chance(eval_files):
    m = _constant_classifier(eval_files / "m.onnx")
    r = _invoke("evaluate", m, "--data", eval_files / "d.npz", "--attack", "none", "--no-progress")
    assert r.exit_code == 0, r.output
    keys = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert "ACC" in keys and "ASR" not in keys and "RA" not in keys, r.stdout
    assert "fed [0, 1] pixels" in r.stdout
    assert "warning:" in r.stderr and "near chance" in r.stderr and "--mean/--std" in r.stderr
    r = _invoke("evaluate", m, "--data", eval_files / "d.npz", "--mean", "0.5", "--std", "0.25", "--no-progress")
    assert r.exit_code == 0 and "near chance" not in r.stderr, r.output  # normalised: the user said how
    r = _invoke("compare", m, m, "--data", eval_files / "d.npz", "--no-progress")
    assert r.exit_code == 0, r.output
    keys = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert "ACC" in keys and "ASR" not in keys and "of triggered ones" not in r.stdout
    r = _invoke("evaluate", m, "--data", eval_files / "d.npz", "--attack", "badnets", "--no-progress")
    assert r.exit_code == 0 and re.search(r"^ASR ", r.stdout, re.M), r.output


def test_evaluate_reads_the_normalisation_the_model_records(eval_files):
    norm = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}
    m = _constant_classifier(eval_files / "m.onnx", {"onnxclp.normalize": json.dumps(norm)})
    r = _invoke("evaluate", m, "--data", eval_files / "d.npz", "--json", "-", "--no-progress")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["attack"]["normalize"] == norm and d["normalize_source"] == "model metadata (onnxclp.normalize)"
    r = _invoke("evaluate", m, "--data", eval_files / "d.npz", "--no-progress")
    assert "from model metadata (onnxclp.normalize)" in r.stdout and "near chance" not in r.stderr
    r = _invoke("evaluate", m, "--data", eval_files / "d.npz", "--mean", "0", "--std", "1", "--json", "-")
    assert json.loads(r.stdout)["normalize_source"] == "--mean/--std"  # the options win
    bad = _constant_classifier(eval_files / "bad.onnx", {"onnxclp.normalize": '{"mean": [0.5]}'})
    r = _invoke("evaluate", bad, "--data", eval_files / "d.npz")
    assert r.exit_code == 2 and "onnxclp.normalize" in r.stderr and "--mean/--std" in r.stderr


def test_normalization_from_metadata():
    from onnxclp.eval.normalize import NORMALIZE_KEY, normalization_from_metadata, set_normalization

    m = onnx.ModelProto()
    assert normalization_from_metadata(m) is None
    set_normalization(m, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    set_normalization(m, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])  # replaced, not added
    assert [p.key for p in m.metadata_props] == [NORMALIZE_KEY]
    assert normalization_from_metadata(m) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert normalization_from_metadata({"Image.NominalPixelRange": "Normalized_1_1"}) == ([0.5], [0.5])
    assert normalization_from_metadata({"Image.NominalPixelRange": "NominalRange_0_255"}) == ([0.0], [1 / 255])
    props = {"standardization_mean": "[0.4, 0.4, 0.4]", "standardization_std": "[0.2, 0.2, 0.2]"}
    assert normalization_from_metadata(props) == ([0.4] * 3, [0.2] * 3)
    for bad in ("[1, 2]", '{"mean": [0.5], "std": [0]}', '{"mean": ["a"], "std": [1]}', "nan"):
        with pytest.raises(OnnxclpError, match=r"onnxclp\.normalize"):
            normalization_from_metadata({NORMALIZE_KEY: bad})


# -- 5: --help at 80 columns ------------------------------------------------------------------------------------


COMMANDS = ["sanitize", "scan", "methods", "evaluate", "compare", "sweep", "tac", "grid"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_cuts_no_choice_list(command):
    r = _invoke(command, "--help")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for line in lines:  # an option's metavar such as <a|b|c> opens and closes on its line
        if re.match(r"│\s+(\*\s+)?--", line):
            metavar = re.search(r"\s(<[A-Za-z][\w|.-]*(?: range)?>?)", line)
            assert metavar is None or metavar.group(1).endswith(">"), line


def test_method_help_points_to_onnxclp_methods():
    text = " ".join(_invoke("sanitize", "--help").stdout.replace("│", " ").split())
    assert "`onnxclp methods` describes each" in text
    assert "Lipschitzness-based pruning" not in text  # the descriptions are in `onnxclp methods`


def test_report_format_lists_only_json_and_sarif():
    text = _invoke("sanitize", "--help").stdout
    line = next(line for line in text.splitlines() if "--report-format" in line)
    assert "text" not in line


# -- 6: where the report went ------------------------------------------------------------------------------------


def test_sanitize_says_where_the_report_went(tmp_path):
    from builders import conv_bn

    w = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    onnx.save(conv_bn(w, gamma=np.ones(8)), str(tmp_path / "m.onnx"))
    r = _invoke("sanitize", tmp_path / "m.onnx", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert f"report: {tmp_path / 'r.json'}" in r.stderr, r.stderr


# -- 9, 10: extras ----------------------------------------------------------------------------------------------


def test_methods_table_shows_each_methods_extra():
    r = _invoke("methods")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split()[:3] == ["method", "data", "extra"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[1:] if line and not line.startswith(" ")}
    assert rows["otbr"] == ["none", "eval"] and rows["clp"] == ["none", "-"]
    assert rows["anp"] == ["--clean-data", "eval"]
    assert "download.pytorch.org/whl/cpu" in r.stdout  # how to install the extra


def test_missing_extra_hint_names_the_install_routes():
    from onnxclp.cli.common import require_extra

    with pytest.raises(OnnxclpError) as exc:
        require_extra("eval", "onnxclp_no_such_module")
    message = exc.value.message
    assert "'eval' extra" in message and "pip install 'onnxclp[eval]'" in message
    assert "--index-url https://download.pytorch.org/whl/cpu" in message and "onnxclp[eval-gpu]" in message
    assert "\n" not in message
    with pytest.raises(OnnxclpError, match=r"'plot' extra .*: pip install 'onnxclp\[plot\]'$"):
        require_extra("plot", "onnxclp_no_such_module")


def test_plot_extra_is_matplotlib_alone():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["plot"]] == ["matplotlib"]
    assert {"eval", "eval-gpu", "test", "fuzz", "scale"} <= set(extras)


# -- 11: the project's URLs -------------------------------------------------------------------------------------


def test_project_urls_and_sarif_information_uri(monkeypatch):
    tomllib = pytest.importorskip("tomllib")
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert set(urls) >= {"Homepage", "Repository", "Documentation", "Issues"}
    assert all(u.startswith("https://github.com/onnxclp/onnxclp") for u in urls.values())
    meta = email.message.Message()
    for label, url in urls.items():
        meta["Project-URL"] = f"{label}, {url}"
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: meta)
    from onnxclp.sarif import to_sarif

    driver = to_sarif([], tool_version="0.1.0")["runs"][0]["tool"]["driver"]
    assert driver["informationUri"] == urls["Homepage"]
