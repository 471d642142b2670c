"""The gate fails closed (issue 20, items 1 and 5): ``unverified`` when no detector could examine a model, the
classifier detector reading 1x1-convolution and MatMul classifiers, a detector that fails, the exit codes, the
closing tally, the failing models named on stderr and the next step. Small models built with onnx.helper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import init, model
from onnx import helper
from typer.testing import CliRunner

from onnxclp import detect, methods, scanning
from onnxclp.cli import app
from onnxclp.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_OUTLIERS, EXIT_UNVERIFIED
from onnxclp.sarif import to_sarif

K = 10  # classes
SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"


def _features(rng: np.random.Generator, nodes: list, inits: list) -> str:
    inits.append(init("W1", rng.normal(size=(16, 3, 3, 3))))
    nodes += [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    return "r1"


def _head_weight(rng: np.random.Generator, target: int | None) -> np.ndarray:
    w = rng.normal(size=(K, 16))
    if target is not None:
        w[target] += 3.0  # the target's row stands apart from the others: a poisoned-label shortcut
    return w


def conv_head(kernel: int = 1, *, target: int | None = None, pool: str = "after", seed: int = 1) -> onnx.ModelProto:
    """features -> classifier Conv (``kernel`` x ``kernel``, K outputs); ``pool``: ``after`` (Conv -> GAP ->
    Flatten), ``before`` (GAP -> Conv, output N x K x 1 x 1) or ``none`` (the Conv's map is the output)."""
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    h = _features(rng, nodes, inits)
    w = np.repeat(_head_weight(rng, target)[:, :, None, None], kernel, 2).repeat(kernel, 3) / kernel**2
    inits.append(init("Wc", w))
    pads = [kernel // 2] * 4
    if pool == "before":
        nodes += [
            helper.make_node("GlobalAveragePool", [h], ["g"], name="gap"),
            helper.make_node("Conv", ["g", "Wc"], ["y"], name="head", pads=pads),
        ]
        return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", K, 1, 1])], inits)
    if pool == "none":
        nodes.append(helper.make_node("Conv", [h, "Wc"], ["y"], name="head", pads=pads))
        return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", K, 8, 8])], inits)
    nodes += [
        helper.make_node("Conv", [h, "Wc"], ["c2"], name="head", pads=pads),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["y"], name="flat"),
    ]
    return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", K])], inits)


def matmul_head(*, weight_first: bool = False, target: int | None = None, seed: int = 1) -> onnx.ModelProto:
    """features -> GAP -> Flatten -> MatMul with a constant weight (+ Add bias): X @ W[in, K], or W[K, in] @ X^T."""
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    h = _features(rng, nodes, inits)
    nodes += [
        helper.make_node("GlobalAveragePool", [h], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
    ]
    w = _head_weight(rng, target)
    if weight_first:
        inits += [init("Wm", w), init("Bm", np.zeros((K, 1)))]
        nodes += [
            helper.make_node("Transpose", ["f"], ["ft"], name="t1"),
            helper.make_node("MatMul", ["Wm", "ft"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "Bm"], ["mt"], name="fc_bias"),
            helper.make_node("Transpose", ["mt"], ["y"], name="t2"),
        ]
    else:
        inits += [init("Wm", w.T), init("Bm", np.zeros(K))]
        nodes += [
            helper.make_node("MatMul", ["f", "Wm"], ["m"], name="fc"),
            helper.make_node("Add", ["m", "Bm"], ["y"], name="fc_bias"),
        ]
    return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", K])], inits)


def no_classifier() -> onnx.ModelProto:
    """features -> Relu at the output: no layer produces the logits directly."""
    rng = np.random.default_rng(0)
    nodes: list = []
    inits: list = []
    h = _features(rng, nodes, inits)
    nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 16, 8, 8])], inits)


def save(m: onnx.ModelProto, path: Path) -> str:
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return str(path)


def scan(path: str, **config) -> dict:
    return scanning.scan_model(path, scanning.ScanConfig(**config))


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- the classifier detector reads 1x1-convolution and MatMul classifiers -------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda t: conv_head(1, target=t), id="conv1x1-then-gap"),
        pytest.param(lambda t: conv_head(1, target=t, pool="before"), id="gap-then-conv1x1"),
        pytest.param(lambda t: matmul_head(target=t), id="matmul-x-w"),
        pytest.param(lambda t: matmul_head(weight_first=True, target=t), id="matmul-w-x"),
    ],
)
def test_classifier_layers_are_read(build, tmp_path: Path) -> None:
    """Each head is read as the classifier: a planted target row is found (suspicious, right class); without it
    the model is clean, not unverified."""
    backdoored = scan(save(build(3), tmp_path / "b.onnx"))
    assert backdoored["verdict"] == "suspicious" and backdoored["target"] == 3, backdoored["detectors_skipped"]
    assert backdoored["detectors"]["classifier"]["p_value"] < 1e-6
    clean = scan(save(build(None), tmp_path / "c.onnx"))
    assert clean["verdict"] == "clean" and "classifier" in clean["detectors"]
    assert clean["detectors_skipped"] == {}


# --- unverified --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        pytest.param(lambda: conv_head(3), "3x3 Conv", id="kxk-conv-head"),
        pytest.param(lambda: conv_head(1, pool="none"), "not globally pooled", id="conv1x1-spatial-map"),
        pytest.param(no_classifier, "no layer with weights produces the model output", id="no-classifier"),
    ],
)
def test_no_detector_applies_is_unverified(build, reason: str, tmp_path: Path) -> None:
    """With the weight-only detector alone (as without torch), a head it cannot read leaves the model unverified.
    (By default MM-BD also runs and reads any 2-D logit output: test_default_mmbd_reads_a_kxk_head.)"""
    entry = scan(save(build(), tmp_path / "m.onnx"), detectors=("classifier",))
    assert entry["verdict"] == "unverified" and entry["target"] is None and entry["error"] is None
    assert entry["detectors"] == {} and reason in entry["detectors_skipped"]["classifier"]
    assert entry["report"]["verdict"]["verdict"] == "unverified"


def integer_only() -> onnx.ModelProto:
    """A dynamically quantised classifier (onnxruntime's ``quantize_dynamic`` form): DynamicQuantizeLinear ->
    ConvInteger -> Cast -> Mul by the scales -> GlobalAveragePool -> Flatten: no layer with a float weight."""
    from onnx import TensorProto, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8), "w")
    wz = numpy_helper.from_array(np.array(0, np.int8), "wz")
    ws = init("ws", np.array(0.01, np.float32))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="q"),
        helper.make_node("ConvInteger", ["xq", "w", "xz", "wz"], ["acc"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Mul", ["accf", "s"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4])], [w, wz, ws])


def test_a_model_with_nothing_to_score_is_unverified_not_an_error(tmp_path: Path) -> None:
    """A model onnx's checker accepts is never bad input: an int8 model of integer operators, which no detector can
    read, is ``unverified`` with every reason (exit 6 under --fail-on suspicious), not a scan error (session 20;
    before: 'no layer can be scored', exit 3)."""
    path = save(integer_only(), tmp_path / "int8.onnx")
    entry = scan(path)
    assert entry["verdict"] == "unverified" and entry["error"] is None and entry["exit_code"] == EXIT_OK
    assert "no layer with a constant float weight" in entry["detectors_skipped"]["layers"]
    assert "classifier" in entry["detectors_skipped"]
    r = invoke("scan", path, "--fail-on", "suspicious")
    assert r.exit_code == EXIT_UNVERIFIED and "1 unverified" in r.output


@pytest.fixture
def failing_detector():
    """A registered detector that raises (removed from the registry afterwards)."""

    class Boom(detect.Detector):
        name = "boom-test"
        description = "raises"
        default = False

        def run(self, state):
            raise RuntimeError("kaput")

    detect.register(Boom)
    yield "boom-test"
    detect._REGISTRY._classes.pop("boom-test")


def test_a_detector_that_fails_is_not_applied(failing_detector: str, tmp_path: Path) -> None:
    """A detector that raises is 'not applied' with the reason; alone it leaves the model unverified, next to a
    detector that works the verdict is that one's."""
    path = save(conv_head(1, target=3), tmp_path / "m.onnx")
    alone = scan(path, detectors=(failing_detector,))
    assert alone["verdict"] == "unverified"
    assert alone["detectors_skipped"] == {failing_detector: "failed: RuntimeError: kaput"}
    both = scan(path, detectors=("classifier", failing_detector))
    assert both["verdict"] == "suspicious" and both["target"] == 3
    assert both["detectors"]["classifier"]["threshold"] == pytest.approx(0.01)  # only the detector that ran counts
    assert both["p_value"] is not None and both["p_value"] < 0.01
    assert both["detectors_skipped"][failing_detector].startswith("failed:")


# --- exit codes --------------------------------------------------------------------------------------------------------


@pytest.fixture
def zoo(tmp_path: Path) -> dict[str, str]:
    return {
        "suspicious": save(conv_head(1, target=3), tmp_path / "a_suspicious.onnx"),
        "clean": save(matmul_head(), tmp_path / "b_clean.onnx"),
        # no classifier layer and a spatial output: neither the classifier detector nor MM-BD can examine it
        "unverified": save(no_classifier(), tmp_path / "c_unverified.onnx"),
    }


@pytest.mark.parametrize(
    ("models", "options", "code"),
    [
        (["unverified"], ["--fail-on", "suspicious"], EXIT_UNVERIFIED),
        (["unverified"], ["--fail-on", "suspicious", "--allow-unverified"], EXIT_OK),
        (["unverified"], [], EXIT_OK),  # no gate asked for: report only
        (["unverified"], ["--fail-on", "never"], EXIT_OK),
        (["unverified", "clean"], ["--fail-on", "suspicious"], EXIT_UNVERIFIED),
        (["unverified", "suspicious"], ["--fail-on", "suspicious"], EXIT_OUTLIERS),  # a finding outranks
        (["clean"], ["--fail-on", "suspicious"], EXIT_OK),
        (["unverified", "broken"], ["--fail-on", "suspicious"], EXIT_BAD_INPUT),  # not scanned outranks all
        (["broken"], ["--fail-on", "never"], EXIT_BAD_INPUT),  # an unreadable model never passes
        (["broken"], [], EXIT_BAD_INPUT),
    ],
)
def test_exit_codes(zoo: dict[str, str], tmp_path: Path, models: list[str], options: list[str], code: int) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07not a model")
    paths = [zoo.get(m, str(tmp_path / f"{m}.onnx")) for m in models]
    r = invoke("scan", *paths, *options, "-q")
    assert r.exit_code == code, r.stdout + r.stderr


def test_exit_code_function() -> None:
    def e(verdict: str, code: int = 0) -> dict:
        return {"verdict": verdict, "exit_code": code, "report": {"totals": {"pruned_channels": 0}}}

    assert scanning.exit_code([e("unverified")], "suspicious") == EXIT_UNVERIFIED
    assert scanning.exit_code([e("unverified")], "suspicious", allow_unverified=True) == EXIT_OK
    assert scanning.exit_code([e("unverified")], "outliers") == EXIT_OK
    flagged = e("unverified")
    flagged["report"]["totals"]["pruned_channels"] = 2
    assert scanning.exit_code([flagged], "outliers") == EXIT_OUTLIERS  # a flagged channel, whatever the verdict
    assert scanning.exit_code([e("unverified"), e("error", 4), e("error", 2)], "suspicious") == 4
    assert scanning.exit_code([e("error", 3)], None) == 3


# --- what the gate prints ------------------------------------------------------------------------------------------------


def test_text_ends_with_the_tally_and_failing_models_are_named(zoo: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"garbage")
    paths = [zoo["suspicious"], zoo["clean"], zoo["unverified"], tmp_path / "broken.onnx"]
    r = invoke("scan", *paths, "--fail-on", "suspicious")
    assert r.exit_code == EXIT_BAD_INPUT
    assert r.stdout.splitlines()[-1] == "4 models: 1 suspicious, 1 clean, 1 unverified, 1 error"
    assert f"{zoo['unverified']}: unverified (no selected detector could examine it)" in r.stdout
    err = r.stderr.splitlines()
    assert f"FAIL {zoo['suspicious']}: suspicious; target class 3; classifier p=" in r.stderr
    assert any(line.startswith(f"FAIL {zoo['unverified']}: unverified; ") and "no layer with weights" in line
               for line in err)  # fmt: skip
    assert not any(zoo["clean"] in line for line in err)
    assert any(line.startswith("error: ") and "broken.onnx" in line for line in err)
    assert "scan: 3 of 4 models failed the gate (--fail-on suspicious): exit 2" in err
    [hint] = [line for line in err if line.startswith("next: ")]
    assert f"onnxclp sanitize {zoo['suspicious']} OUT.onnx --method " in hint and "--allow-unverified" in hint
    assert "4 models:" not in r.stderr  # the tally is on stdout with the text report


@pytest.mark.parametrize("where", ["file", "quiet", "json"])
def test_failing_models_named_with_output_file_quiet_or_json(zoo: dict[str, str], tmp_path: Path, where: str) -> None:
    """Issue 22.14: with --output FILE, -q or a JSON report the terminal still names the failing models."""
    options = {
        "file": ["--output", tmp_path / "report.txt"],
        "quiet": ["-q"],
        "json": ["--format", "json"],
    }[where]
    r = invoke("scan", zoo["suspicious"], zoo["clean"], zoo["unverified"], "--fail-on", "suspicious", *options)
    assert r.exit_code == EXIT_OUTLIERS
    assert f"FAIL {zoo['suspicious']}: suspicious" in r.stderr
    assert f"FAIL {zoo['unverified']}: unverified" in r.stderr
    assert "scan: 2 of 3 models failed the gate (--fail-on suspicious): exit 1" in r.stderr
    tally = "3 models: 1 suspicious, 1 clean, 1 unverified, 0 errors"
    if where == "file":
        assert (tmp_path / "report.txt").read_text().splitlines()[-1] == tally
        assert tally in r.stderr and r.stdout == ""
    elif where == "json":
        assert [e["verdict"] for e in json.loads(r.stdout)] == ["suspicious", "clean", "unverified"]
        assert tally in r.stderr
    else:
        assert r.stdout.splitlines()[-1] == tally and len(r.stdout.splitlines()) == 4
    assert ("next: " in r.stderr) == (where != "quiet")


def test_next_step_comes_from_the_registry() -> None:
    free, few = scanning.suggested_methods("clp")
    registered = {n: methods.get(n).needs for n in methods.names()}
    assert registered[free] == "nothing"
    assert few is None or registered[few] == "clean-data"
    entry = {"path": "m.onnx", "verdict": "suspicious", "detectors_skipped": {}}
    hint = scanning.next_step([entry], "clp")
    assert hint is not None and hint.startswith(f"next: onnxclp sanitize m.onnx OUT.onnx --method {free}")
    assert scanning.next_step([{**entry, "verdict": "clean"}]) is None
    unverified = scanning.next_step([{**entry, "verdict": "unverified"}], "clp", allow_unverified=True)
    assert unverified is not None and "--allow-unverified" not in unverified
    open_size = {**entry, "verdict": "unverified",
                 "detectors_skipped": {"mmbd": "the model's input shape [1, 3, 'h', 'w'] does not give one image's "
                                               "C,H,W: pass --input-shape C,H,W"}}  # fmt: skip
    hint = scanning.next_step([open_size], "clp")
    assert hint is not None and "give it with --input-shape C,H,W" in hint and "--allow-unverified" in hint


def test_json_and_sarif_say_unverified(zoo: dict[str, str], tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft4Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))
    sarif, data = tmp_path / "s.sarif", tmp_path / "s.json"
    r = invoke("scan", zoo["unverified"], zoo["clean"], "--fail-on", "suspicious", "--sarif", sarif, "--json", data)
    assert r.exit_code == EXIT_UNVERIFIED
    entries = json.loads(data.read_text())
    assert entries[0]["verdict"] == "unverified" and "classifier" in entries[0]["detectors_skipped"]
    log = json.loads(sarif.read_text())
    assert not list(validator.iter_errors(log))
    [result] = [x for x in log["runs"][0]["results"] if x["ruleId"] == "ONNXCLP006"]
    assert result["level"] == "error" and "unverified" in result["message"]["text"]
    assert "no layer with weights" in result["message"]["text"]
    assert result["properties"]["detectorsSkipped"]["classifier"]
    rule = log["runs"][0]["tool"]["driver"]["rules"][result["ruleIndex"]]
    assert rule["name"] == "model-unverified" and rule["properties"]["security-severity"] == "7.0"
    allowed = to_sarif(entries, tool_version="0.1.0", allow_unverified=True)
    assert [x["level"] for x in allowed["runs"][0]["results"] if x["ruleId"] == "ONNXCLP006"] == ["warning"]
    assert not list(validator.iter_errors(allowed))


# --- external weights stand for their model -------------------------------------------------------------------------


def test_onnx_data_file_stands_for_its_model(tmp_path: Path) -> None:
    """Issue 22.14: a commit that changes only model.onnx.data (the pre-commit hook passes it) scans model.onnx."""
    m = matmul_head()
    onnx.save(m, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)  # fmt: skip
    data = str(tmp_path / "model.onnx.data")
    files, missing = scanning.expand_paths([data, str(tmp_path / "model.onnx")])
    assert files == [str(tmp_path / "model.onnx")] and missing == []
    (tmp_path / "orphan.onnx.data").write_bytes(b"\0" * 8)
    files, missing = scanning.expand_paths([str(tmp_path / "orphan.onnx.data")])
    assert files == [] and "without their model" in missing[0]["error"]
    r = invoke("scan", data, "--fail-on", "suspicious", "-q")
    assert r.exit_code == EXIT_OK, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 'model.onnx'}: clean")
