"""The opt-in data-free detector ``freeeagle`` (FreeEagle, USENIX Security 2023; issue 20) and what it needs from the
bridge: the tensors that separate a graph (``OnnxModule.cuts``) and running the graph's tail from one
(``OnnxModule.forward_from``), judged against onnxruntime. Tiny onnx.helper models: seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxclp.bridge import to_torch
from onnxclp.defences.freeeagle import Split, anomaly_metric, choose_split, freeeagle, shape_at
from onnxclp.scanning import ScanConfig, scan_model

R = np.random.default_rng(7)


def _residual(classes: int = 10, batch: int | str = "n", shape_branch: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Relu (r1) -> Conv -> Add(r1) -> Relu (r2) -> Conv -> Relu (r3) -> GAP -> Flatten -> Gemm; with
    ``shape_branch`` the Gemm's output is reshaped to Shape(x)[0] x -1 (a branch read across the whole graph)."""
    c = 6
    inits = {
        "w1": R.normal(0, 0.5, (c, 3, 3, 3)), "b1": R.normal(0, 0.1, c),
        "w2": R.normal(0, 0.3, (c, c, 3, 3)), "b2": R.normal(0, 0.1, c),
        "w3": R.normal(0, 0.3, (c, c, 3, 3)), "b3": R.normal(0, 0.1, c),
        "wf": R.normal(0, 1.0, (classes, c)), "bf": R.normal(0, 0.1, classes),
    }  # fmt: skip
    pads = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], **pads),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **pads),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("Relu", ["s"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], **pads),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"]),
    ]
    nodes.append(helper.make_node("Flatten", ["g"], ["f"]))
    if shape_branch:
        inits["minus1"], inits["zero"] = np.array([-1]), np.array([0])
        nodes += [
            helper.make_node("Shape", ["x"], ["xs"]),
            helper.make_node("Gather", ["xs", "zero"], ["n0"], axis=0),
            helper.make_node("Concat", ["n0", "minus1"], ["to"], axis=0),
            helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1),
            helper.make_node("Reshape", ["logits", "to"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1))
    tensors = [numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v.astype(np.int64), k)
               for k, v in inits.items()]  # fmt: skip
    g = helper.make_graph(
        nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], tensors,
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_cuts_are_the_tensors_that_separate_the_graph() -> None:
    module = to_torch(_residual())
    # not c2 (r1 is still read by the Add), not y (a graph output)
    assert module.cuts() == ["c1", "r1", "s", "r2", "c3", "r3", "g", "f"]
    # Shape(x) is read by the Reshape after the classifier: nothing separates the graph
    assert to_torch(_residual(shape_branch=True)).cuts() == []


@pytest.mark.parametrize("batch", ["n", 1])
def test_forward_from_a_cut_runs_the_tail_as_onnxruntime_does(batch: int | str) -> None:
    """The tail run from r2's value gives onnxruntime's logits; a graph exported with batch 1 runs its tail at 5."""
    model = _residual(batch=batch)
    x = R.random((1, 3, 8, 8)).astype(np.float32)
    extra = onnx.helper.make_tensor_value_info("r2", TensorProto.FLOAT, None)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(extra)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ref, r2 = sess.run(None, {"x": x})
    module = to_torch(model).eval()
    with torch.no_grad():
        y = module.forward_from("r2", torch.from_numpy(r2))
        assert np.allclose(y.numpy(), y_ref, atol=1e-5)
        five = module.forward_from("r2", torch.from_numpy(np.repeat(r2, 5, axis=0)))
        assert five.shape == (5, 10) and np.allclose(five.numpy(), np.repeat(y_ref, 5, axis=0), atol=1e-5)
    with pytest.raises(KeyError, match="does not separate"):
        module.forward_from("c2", torch.from_numpy(r2))


def test_the_split_is_the_cut_nearest_the_middle_of_the_weighted_layers() -> None:
    module = to_torch(_residual()).eval()
    split = choose_split(module)
    # weighted layers: conv1, conv2, conv3, gemm; cuts after 1 (c1, r1), 2 (s, r2) and 3 (c3, r3, g, f) of 4
    assert isinstance(split, Split) and split.tensor == "r2" and split.position == 0.5 and split.nonnegative
    assert choose_split(module, at=0.25).tensor == "r1"
    assert choose_split(module, at=1.0).tensor == "f"  # never after the last weighted layer: at least one left
    split = shape_at(module, split, torch.zeros(1, 3, 8, 8))
    assert split.shape == (6, 8, 8)
    assert "no tensor separates" in choose_split(to_torch(_residual(shape_branch=True)))


def test_anomaly_metric_is_the_papers_quartile_rule() -> None:
    v = np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 20])  # non-zero: 1..8, 20; Q1 at int(2.25)=2 -> 3, Q3 at 6 -> 7
    assert anomaly_metric(v) == pytest.approx((20 - 7) / (7 - 3))
    assert anomaly_metric(np.zeros(10)) == 0.0


def test_freeeagle_finds_a_planted_shortcut_to_a_class() -> None:
    """A tail with a shortcut: one channel of r2 drives class 3 hard through the classifier whatever else is there.
    Optimising a representation for any other class leaves class 3 a share of the score; FreeEagle names it."""
    model = _residual()
    wf = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "wf")).copy()
    wf[:, 5] = -0.5
    wf[3, 5] = 6.0  # r3's channel 5 -> class 3
    w3 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w3")).copy()
    w3[5] = 0.0
    w3[5, :, 1, 1] = 2.0  # channel 5 of r3 follows every channel of r2: any representation feeds it
    for t in model.graph.initializer:
        if t.name in ("wf", "w3"):
            t.CopyFrom(numpy_helper.from_array({"wf": wf, "w3": w3}[t.name], t.name))
    module = to_torch(model).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    split = shape_at(module, choose_split(module), torch.zeros(1, 3, 8, 8))
    result = freeeagle(module, split, 10, steps=200)
    assert result.target == 3 and result.tendency.argmax() == 3 and result.metric > 2
    assert result.scores.shape == (10, 10) and np.all(np.diag(result.scores) == 0)
    assert result.p_value < 0.05 and result.reached >= 1


def test_scan_runs_freeeagle_only_when_named(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_residual(), path)
    default = scan_model(str(path), ScanConfig())
    assert "freeeagle" not in default["detectors"] and "freeeagle" not in default["detectors_skipped"]
    named = scan_model(str(path), ScanConfig(detectors=("freeeagle",)))
    d = named["detectors"]["freeeagle"]
    assert 0 <= d["target"] < 10 and 0 <= d["p_value"] <= 1 and "cut at 'r2'" in d["detail"]
    onnx.save(_residual(shape_branch=True), path)
    skipped = scan_model(str(path), ScanConfig(detectors=("freeeagle",)))
    assert skipped["verdict"] == "unverified" and "no tensor separates" in skipped["detectors_skipped"]["freeeagle"]
    onnx.save(_residual(classes=4), path)
    few = scan_model(str(path), ScanConfig(detectors=("freeeagle",)))
    assert "4 classes" in few["detectors_skipped"]["freeeagle"]
