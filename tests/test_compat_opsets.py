"""Models as old exporters wrote them (issue 19): IR versions 3 to 10, opsets 7 to 21, initializers that are graph
inputs, operators read at the model's opset, and the conventions of the ONNX Model Zoo's Caffe2 classics.

Every model is built with onnx.helper at each (opset, IR version) of :data:`CASES`, checked by onnx's checker,
saved and sanitized from the file (so the safe loader's checks run too), and onnxruntime is the judge: the
planted outlier channel is pruned (exactly 0 after its affine) and every other channel of that layer is unchanged;
with a u that prunes nothing, the sanitized model's outputs equal the input's bit for bit.
docs/compatibility.md names these tests.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import run
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import onnxclp
from onnxclp.errors import OnnxclpError
from onnxclp.graph import GraphIndex
from onnxclp.io import TensorStore
from onnxclp.layers import find_layers

# (opset, IR version, initializers also graph inputs). IR 3 requires them as inputs; opset 21 needs IR 10.
CASES = [
    (7, 3, True),
    (9, 3, True),
    (9, 4, True),
    (11, 5, False),
    (11, 6, True),
    (13, 7, True),
    (13, 7, False),
    (17, 8, True),
    (17, 9, False),
    (21, 10, True),
    (21, 10, False),
]
IDS = [f"opset{o}-ir{i}{'-inputs' if a else ''}" for o, i, a in CASES]
K = 8  # channels of the planted layer
BAD = 2  # its outlier channel
U = 2.0  # 8 channels: a z-score cannot pass 2.47, so u = 3 could never flag one


def f32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


class Graph:
    """Nodes and initializers of one test model, with version-aware builders for the ops whose form changed."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def init(self, name: str, value, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, name: str, value) -> str:
        return self.init(name, value, np.int64)

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs))
        return outputs[0]

    def conv(self, x: str, out: str, w: np.ndarray, **attrs) -> str:
        return self.node("Conv", [x, self.init(out + "_W", w)], [out], **attrs)

    def bn(self, x: str, out: str, k: int, gamma=None) -> str:
        names = [
            self.init(f"{out}_{p}", v)
            for p, v in (("s", np.ones(k) if gamma is None else gamma), ("b", np.linspace(-0.1, 0.1, k)))
        ]
        names += [
            self.init(f"{out}_mean", np.linspace(-0.2, 0.2, k)),
            self.init(f"{out}_var", np.linspace(0.8, 1.2, k)),
        ]
        legacy = {"spatial": 1} if self.opset < 9 else {}  # BatchNormalization 7: explicit per-channel form
        return self.node("BatchNormalization", [x, *names], [out], epsilon=1e-5, **legacy)

    def axes_op(self, op: str, x: str, out: str, axes: list[int], new_from: int, **attrs) -> str:
        """Squeeze/Unsqueeze (axes an input from 13) and ReduceMean (from 18)."""
        if self.opset >= new_from:
            return self.node(op, [x, self.ints(out + "_axes", axes)], [out], **attrs)
        return self.node(op, [x], [out], axes=axes, **attrs)

    def unsqueeze(self, x: str, out: str, axes: list[int]) -> str:
        return self.axes_op("Unsqueeze", x, out, axes, 13)

    def clip(self, x: str, out: str, lo: float, hi: float) -> str:
        if self.opset >= 11:
            return self.node("Clip", [x, self.init(out + "_lo", lo), self.init(out + "_hi", hi)], [out])
        return self.node("Clip", [x], [out], min=lo, max=hi)

    def dropout(self, x: str, out: str) -> str:
        if self.opset >= 12:  # ratio and training_mode are inputs; the mask output is optional
            return self.node("Dropout", [x, self.init(out + "_ratio", 0.5)], [out])
        return self.node("Dropout", [x], [out, out + "_mask"], ratio=0.5)  # the mask nobody reads

    def pad(self, x: str, out: str, pads: list[int]) -> str:
        if self.opset >= 11:
            return self.node("Pad", [x, self.ints(out + "_pads", pads)], [out])
        return self.node("Pad", [x], [out], pads=pads)

    def upsample2(self, x: str, out: str) -> str:
        scales = [1.0, 1.0, 2.0, 2.0]
        if self.opset < 9:
            return self.node("Upsample", [x], [out], scales=scales, mode="nearest")
        if self.opset == 9:
            return self.node("Upsample", [x, self.init(out + "_scales", scales)], [out], mode="nearest")
        if self.opset == 10:
            return self.node("Resize", [x, self.init(out + "_scales", scales)], [out], mode="nearest")
        roi = self.init(out + "_roi", np.zeros(0))
        return self.node("Resize", [x, roi, self.init(out + "_scales", scales)], [out], mode="nearest")

    def split2(self, x: str, outs: list[str]) -> list[str]:
        if self.opset >= 13:
            self.node("Split", [x, self.ints(outs[0] + "_split", [K // 2, K // 2])], outs, axis=1)
        else:
            self.node("Split", [x], outs, axis=1, split=[K // 2, K // 2])
        return outs

    def slice(self, x: str, out: str, axis: int, start: int, end: int) -> str:
        if self.opset >= 10:
            names = [self.ints(f"{out}_{n}", [v]) for n, v in (("starts", start), ("ends", end), ("axes", axis))]
            return self.node("Slice", [x, *names], [out])
        return self.node("Slice", [x], [out], axes=[axis], starts=[start], ends=[end])

    def model(self, x_shape: list[int], outputs: dict[str, list[int]], ir: int, as_inputs: bool) -> onnx.ModelProto:
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
        if as_inputs:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()]
        g = helper.make_graph(self.nodes, "compat", inputs, outs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = ir
        onnx.checker.check_model(m, full_check=True)
        return m


def planted(k: int = K, cin: int = 3, kernel: int = 3, bad: int | None = BAD, factor: float = 20.0) -> np.ndarray:
    """One base kernel for every channel, scaled 1.0, 1.05, ... (no outlier), channel ``bad`` times ``factor``."""
    base = np.random.default_rng(7).normal(size=(cin, kernel, kernel))
    w = np.stack([base * (1 + 0.05 * i) for i in range(k)])
    if bad is not None:
        w[bad] *= factor
    return f32(w)


def x_of(shape: list[int]) -> np.ndarray:
    return f32(np.random.default_rng(1).normal(size=shape))


def sanitize_file(m: onnx.ModelProto, tmp_path: Path, **kw) -> tuple[onnx.ModelProto, onnxclp.report.Report]:
    """Save ``m`` and sanitize the file (the safe loader and onnx's checker see it); the output is checked too."""
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    out, rep = onnxclp.sanitize(src, **kw)
    onnx.checker.check_model(out, full_check=True)
    return out, rep


def assert_channel_pruned(before: np.ndarray, after: np.ndarray, pruned: list[int], rescaled=()) -> None:
    """Pruned channels (axis 1) exactly 0; channels neither pruned nor rescaled unchanged."""
    assert np.all(after[:, pruned] == 0)
    keep = [c for c in range(before.shape[1]) if c not in pruned and c not in rescaled]
    np.testing.assert_allclose(after[:, keep], before[:, keep], rtol=1e-6, atol=1e-6)


def assert_unchanged(m: onnx.ModelProto, out: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for a, b in zip(run(m, feeds), run(out, feeds), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Operators whose signature changed, read at the model's opset (issue 19, item 2)
# ---------------------------------------------------------------------------------------------------------------


def gallery(opset: int, ir: int, as_inputs: bool) -> onnx.ModelProto:
    """Conv -> BN -> Clip -> Dropout -> Pad -> MaxPool -> Upsample/Resize -> Split -> Sum, Max, Mean -> Slice ->
    ReduceMean -> Unsqueeze -> Squeeze -> Gemm -> Softmax, each in the form of ``opset``."""
    g = Graph(opset)
    g.conv("x", "c1", planted(), pads=[1, 1, 1, 1])
    g.bn("c1", "b1", K)
    g.clip("b1", "r1", 0.0, 6.0)
    g.dropout("r1", "d1")
    g.pad("d1", "p1", [0, 0, 1, 1, 0, 0, 1, 1])
    g.node("MaxPool", ["p1"], ["m1"], kernel_shape=[3, 3])
    g.upsample2("m1", "u1")
    s0, s1 = g.split2("u1", ["s0", "s1"])
    g.node("Sum", [s0, s1], ["sum"])
    g.node("Max", [s0, s1], ["max"])
    g.node("Mean", ["sum", "max"], ["mean"])
    g.slice("mean", "sl", 2, 0, 8)
    g.axes_op("ReduceMean", "sl", "rm", [2, 3], 18, keepdims=0)
    g.unsqueeze("rm", "us", [2])
    g.axes_op("Squeeze", "us", "sq", [2], 13)
    fc_w = g.init("fc_W", np.random.default_rng(3).normal(size=(5, K // 2)))
    g.node("Gemm", ["sq", fc_w, g.init("fc_b", np.zeros(5))], ["fc"], transB=1)  # C is required before opset 11
    g.node("Softmax", ["fc"], ["y"])
    return g.model([1, 3, 8, 8], {"y": [1, 5]}, ir, as_inputs)


@pytest.mark.parametrize(("opset", "ir", "as_inputs"), CASES, ids=IDS)
def test_changed_operators_at_each_opset(opset: int, ir: int, as_inputs: bool, tmp_path: Path) -> None:
    m = gallery(opset, ir, as_inputs)
    feeds = {"x": x_of([1, 3, 8, 8])}
    for method in ("clp", "lpp"):
        out, rep = sanitize_file(m, tmp_path, method=method, u=U)
        layer = next(layer for layer in rep.layers if layer.node == "c1")
        assert layer.pruned == [BAD] and layer.affine == "b1"
        assert_channel_pruned(run(m, feeds, ["b1"])[0], run(out, feeds, ["b1"])[0], [BAD], layer.rescaled)
        assert ("c1_W" in rep.initializer_inputs or "b1_s" in rep.initializer_inputs) == as_inputs
        out, rep = sanitize_file(m, tmp_path, method=method, u=100.0)
        assert rep.pruned_channels == 0
        assert_unchanged(m, out, feeds)


# ---------------------------------------------------------------------------------------------------------------
# Conventions of the Model Zoo's Caffe2 classics (issue 19, item 3)
# ---------------------------------------------------------------------------------------------------------------


def caffe2_block(opset: int, ir: int, as_inputs: bool) -> onnx.ModelProto:
    """DenseNet-121 / Inception v2: Conv -> BN -> Mul(Unsqueeze(w)) -> Add(Unsqueeze(b)) -> Relu, then
    GlobalAveragePool -> 1x1 Conv classifier, whose N x classes x 1 x 1 output is the model's."""
    g = Graph(opset)
    g.conv("x", "c1", planted(), pads=[1, 1, 1, 1])
    g.bn("c1", "b1", K)
    g.node("Mul", ["b1", g.unsqueeze(g.init("sw", np.linspace(0.9, 1.1, K)), "sw_u", [1, 2])], ["m1"])
    g.node("Add", ["m1", g.unsqueeze(g.init("sb", np.linspace(-0.3, 0.3, K)), "sb_u", [1, 2])], ["a1"])
    g.node("Relu", ["a1"], ["r1"])
    g.node("GlobalAveragePool", ["r1"], ["gap"])
    fc = np.random.default_rng(5).normal(size=(6, K, 1, 1))
    fc[4] *= 30  # an outlying class row: a classifier's channels are never pruned
    g.conv("gap", "y", fc)
    return g.model([1, 3, 6, 6], {"y": [1, 6, 1, 1]}, ir, as_inputs)


@pytest.mark.parametrize(("opset", "ir", "as_inputs"), CASES, ids=IDS)
def test_caffe2_batchnorm_scale_and_conv_classifier(opset: int, ir: int, as_inputs: bool, tmp_path: Path) -> None:
    m = caffe2_block(opset, ir, as_inputs)
    feeds = {"x": x_of([1, 3, 6, 6])}
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U)
    assert [layer.pruned for layer in rep.layers if layer.node == "c1"] == [[BAD]]
    assert rep.layers[0].affine == "b1, m1, a1"
    skipped = {s.node: s.reason for s in rep.skipped}
    assert "fully connected" in skipped["y"]  # the 1x1 classifier conv is the Gemm classifier's equal
    assert_channel_pruned(run(m, feeds, ["a1"])[0], run(out, feeds, ["a1"])[0], [BAD])
    out, rep = sanitize_file(m, tmp_path, method="lpp", u=U)
    clf = next(layer for layer in rep.layers if layer.node == "y")
    assert clf.role == "output" and clf.pruned == [] and clf.rescaled == {}
    assert_channel_pruned(run(m, feeds, ["a1"])[0], run(out, feeds, ["a1"])[0], [BAD], rep.layers[0].rescaled)


def squeezenet_tail(opset: int, ir: int, as_inputs: bool) -> onnx.ModelProto:
    """SqueezeNet: Conv -> Relu -> Dropout -> 1x1 Conv (classes) -> Relu -> GlobalAveragePool -> Softmax output."""
    g = Graph(opset)
    g.conv("x", "c1", planted(), pads=[1, 1, 1, 1])
    g.node("Relu", ["c1"], ["r1"])
    g.dropout("r1", "d1")
    fc = np.random.default_rng(6).normal(size=(6, K, 1, 1))
    fc[1] *= 30
    g.conv("d1", "c2", fc)
    g.node("Relu", ["c2"], ["r2"])
    g.node("GlobalAveragePool", ["r2"], ["gap"])
    g.node("Softmax", ["gap"], ["y"], **({"axis": 1} if opset < 13 else {}))
    return g.model([1, 3, 6, 6], {"y": [1, 6, 1, 1]}, ir, as_inputs)


@pytest.mark.parametrize(("opset", "ir", "as_inputs"), CASES, ids=IDS)
def test_squeezenet_classifier_behind_relu_and_pool(opset: int, ir: int, as_inputs: bool, tmp_path: Path) -> None:
    m = squeezenet_tail(opset, ir, as_inputs)
    feeds = {"x": x_of([1, 3, 6, 6])}
    for method in ("clp", "lpp"):
        out, rep = sanitize_file(m, tmp_path, method=method, u=U)
        by_node = {layer.node: layer for layer in rep.layers}
        assert by_node["c1"].pruned == [BAD]
        if method == "lpp":
            assert by_node["c2"].role == "output" and not by_node["c2"].pruned
        else:
            assert "c2" not in by_node and any(s.node == "c2" for s in rep.skipped)
        assert_channel_pruned(run(m, feeds, ["c1"])[0], run(out, feeds, ["c1"])[0], [BAD], by_node["c1"].rescaled)


def resnet_sum(opset: int, ir: int, as_inputs: bool) -> onnx.ModelProto:
    """ResNet-50 / ShuffleNet (Caffe2): two Conv -> BN branches merged by a variadic Sum, then Relu."""
    g = Graph(opset)
    g.conv("x", "ca", planted(), pads=[1, 1, 1, 1])
    g.bn("ca", "ba", K)
    g.conv("x", "cb", planted(factor=10.0)[:, :, 1:2, 1:2])
    g.bn("cb", "bb", K)
    g.node("Sum", ["ba", "bb"], ["s"])
    g.node("Relu", ["s"], ["y"])
    return g.model([1, 3, 6, 6], {"y": [1, K, 6, 6]}, ir, as_inputs)


@pytest.mark.parametrize(("opset", "ir", "as_inputs"), CASES, ids=IDS)
def test_residual_sum_is_a_stream(opset: int, ir: int, as_inputs: bool, tmp_path: Path) -> None:
    m = resnet_sum(opset, ir, as_inputs)
    feeds = {"x": x_of([1, 3, 6, 6])}
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U)
    assert len(rep.coupled) == 1 and rep.coupled[0].merge == "s" and rep.coupled[0].channel == BAD
    pruned = {layer.node: layer.pruned for layer in rep.layers}
    assert sorted(pruned.values()) == [[], [BAD]]  # the stream rule keeps the prune in one layer
    kept = rep.coupled[0].kept
    bn = {"ca": "ba", "cb": "bb"}[kept]
    assert_channel_pruned(run(m, feeds, [bn])[0], run(out, feeds, [bn])[0], [BAD])
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U, streams="all")
    assert sorted(layer.pruned for layer in rep.layers) == [[BAD], [BAD]]
    assert np.all(run(out, feeds)[0][:, BAD] == 0)


def alexnet_tail(opset: int, ir: int, as_inputs: bool) -> onnx.ModelProto:
    """AlexNet / Inception v1: Conv -> Dropout -> BN -> Relu -> LRN -> MaxPool -> Reshape (shape initializer) ->
    Gemm whose weight is a Reshape of a stored vector by a shape initializer -> Softmax output."""
    g = Graph(opset)
    g.conv("x", "c1", planted(), pads=[1, 1, 1, 1])
    g.dropout("c1", "d1")
    g.bn("d1", "b1", K)
    g.node("Relu", ["b1"], ["r1"])
    g.node("LRN", ["r1"], ["l1"], size=3, alpha=1e-4, beta=0.75, bias=1.0)
    g.node("MaxPool", ["l1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2])
    g.node("Reshape", ["p1", g.ints("flat_shape", [1, K * 9])], ["f1"])
    w = g.init("fc_w_flat", np.random.default_rng(4).normal(size=5 * K * 9) * 0.1)
    g.node("Reshape", [w, g.ints("fc_shape", [5, K * 9])], ["fc_W"])
    g.node("Gemm", ["f1", "fc_W", g.init("fc_b", np.zeros(5))], ["fc"], transB=1)
    g.node("Softmax", ["fc"], ["y"])
    return g.model([1, 3, 6, 6], {"y": [1, 5]}, ir, as_inputs)


@pytest.mark.parametrize(("opset", "ir", "as_inputs"), CASES, ids=IDS)
def test_dropout_lrn_and_reshaped_classifier(opset: int, ir: int, as_inputs: bool, tmp_path: Path) -> None:
    m = alexnet_tail(opset, ir, as_inputs)
    feeds = {"x": x_of([1, 3, 6, 6])}
    out, rep = sanitize_file(m, tmp_path, method="lpp", u=U)
    by_node = {layer.node: layer for layer in rep.layers}
    assert by_node["c1"].pruned == [BAD] and by_node["c1"].affine == "b1"  # paired through the Dropout
    assert by_node["fc"].role == "output" and by_node["fc"].weight == "fc_w_flat"
    before, after = run(m, feeds, ["b1", "l1"]), run(out, feeds, ["b1", "l1"])
    assert_channel_pruned(before[0], after[0], [BAD], by_node["c1"].rescaled)
    assert np.all(after[1][:, BAD] == 0)  # LRN keeps a zero channel zero
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U, fuse_bn=True)
    assert rep.fused_batchnorms == 1
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)
    if ir < 4:  # the folded bias is a new initializer: IR 3 requires it as a graph input
        assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}
    out_keep, _ = sanitize_file(m, tmp_path, method="clp", u=U)
    np.testing.assert_allclose(run(out, feeds)[0], run(out_keep, feeds)[0], rtol=1e-5, atol=1e-6)


def test_batchnorm_spatial_0_is_skipped_with_reason(tmp_path: Path) -> None:
    """Before opset 9 a BatchNormalization with spatial=0 has one value per activation: its layer is skipped."""
    g = Graph(7)
    g.conv("x", "c1", planted(), pads=[1, 1, 1, 1])
    names = [g.init(f"p{i}", np.full((K, 4, 4), 1.0 + i)) for i in range(4)]
    g.node("BatchNormalization", ["c1", *names], ["b1"], spatial=0)
    g.conv("b1", "c2", planted(k=4, cin=K, kernel=1, bad=None))
    m = g.model([1, 3, 4, 4], {"c2": [1, 4, 4, 4]}, 3, True)
    run(m, {"x": x_of([1, 3, 4, 4])})  # onnxruntime runs it
    _, rep = sanitize_file(m, tmp_path, method="clp", u=U)
    skipped = {s.node: s.reason for s in rep.skipped}
    assert "spatial=0" in skipped["c1"] and [layer.node for layer in rep.layers] == ["c2"]


# ---------------------------------------------------------------------------------------------------------------
# Initializers that are graph inputs (issue 19, item 1)
# ---------------------------------------------------------------------------------------------------------------


def simple(opset: int, ir: int, as_inputs: bool = True, shared: bool = False) -> onnx.ModelProto:
    g = Graph(opset)
    g.conv("x", "c1", planted(), pads=[1, 1, 1, 1])
    if shared:  # a second conv reads the same weight
        g.node("Conv", ["x", "c1_W"], ["c2"], pads=[1, 1, 1, 1])
        g.node("Add", ["c1", "c2"], ["a"])
        g.node("Relu", ["a"], ["y"])
        return g.model([1, 3, 5, 5], {"y": [1, K, 5, 5]}, ir, as_inputs)
    g.node("Relu", ["c1"], ["y"])
    return g.model([1, 3, 5, 5], {"y": [1, K, 5, 5]}, ir, as_inputs)


@pytest.mark.parametrize(("opset", "ir"), [(9, 3), (13, 8)])
def test_initializer_inputs_are_edited_kept_and_reported(opset: int, ir: int, tmp_path: Path) -> None:
    m = simple(opset, ir)
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U)
    assert rep.layers[0].pruned == [BAD] and rep.initializer_inputs == ["c1_W"]
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]  # interface unchanged
    assert any("graph inputs" in n and "runs with the value fed" in n for n in rep.notes)
    feeds = {"x": x_of([1, 3, 5, 5])}
    assert_channel_pruned(run(m, feeds)[0], run(out, feeds)[0], [BAD])
    assert onnxclp.scan(m, u=U).layers[0].pruned == [BAD]


def test_ir3_copy_of_a_shared_initializer_is_a_graph_input(tmp_path: Path) -> None:
    m = simple(9, 3, shared=True)
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U, streams="all")
    assert rep.copied_tensors and set(rep.copied_tensors) <= {i.name for i in out.graph.input}
    feeds = {"x": x_of([1, 3, 5, 5])}
    assert np.all(run(out, feeds)[0][:, BAD] == 0)


def test_drop_initializer_inputs(tmp_path: Path) -> None:
    m = simple(13, 8)
    out, rep = sanitize_file(m, tmp_path, method="clp", u=U, drop_initializer_inputs=True)
    assert [i.name for i in out.graph.input] == ["x"] and rep.initializer_inputs == ["c1_W"]
    assert any("--drop-initializer-inputs" in n for n in rep.notes)
    feeds = {"x": x_of([1, 3, 5, 5])}
    assert_channel_pruned(run(m, feeds)[0], run(out, feeds)[0], [BAD])
    with pytest.raises(OnnxclpError, match="IR version 3, which requires every initializer"):
        sanitize_file(simple(9, 3), tmp_path, method="clp", u=U, drop_initializer_inputs=True)


def test_drop_initializer_inputs_cli(tmp_path: Path) -> None:
    from onnxclp.cli import app

    onnx.save(simple(13, 8), tmp_path / "in.onnx")
    args = ["sanitize", str(tmp_path / "in.onnx"), str(tmp_path / "out.onnx"), "--u", "2", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--drop-initializer-inputs"])
    assert result.exit_code == 0, result.output
    assert [i.name for i in onnx.load(tmp_path / "out.onnx").graph.input] == ["x"]
    onnx.save(simple(9, 3), tmp_path / "in.onnx")
    result = CliRunner().invoke(app, [*args, "--drop-initializer-inputs"])
    assert result.exit_code == 2 and "IR version 3" in result.output


# ---------------------------------------------------------------------------------------------------------------
# Opset 6 and earlier (no onnxruntime kernel to judge): the finder reads the legacy forms
# ---------------------------------------------------------------------------------------------------------------


def test_legacy_broadcast_and_unsqueeze_read_at_their_opset() -> None:
    """Opset 6: Mul/Add broadcast a per-channel vector only with broadcast=1 (aligned at axis)."""
    g = Graph(6)
    g.conv("x", "c1", planted())
    g.node("Mul", ["c1", g.init("s", np.linspace(1, 2, K))], ["m1"], broadcast=1, axis=1)
    g.node("Add", ["m1", g.init("b", np.zeros(K))], ["a1"], broadcast=1, axis=1)
    g.conv("a1", "c2", planted(k=K, cin=K, bad=None))
    g.node("Mul", ["c2", g.init("s2", np.ones((K, 4, 4)))], ["y"], broadcast=1, axis=1)  # not per channel
    m = g.model([1, 3, 6, 6], {"y": [1, K, 2, 2]}, 3, True)
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, K, 2, 2])])
    index = GraphIndex.of(m)
    assert index.opset == 6 and index.initializers_are_inputs
    layers = {layer.key: layer for layer in find_layers(index, TensorStore(m, Path("."))).layers}
    assert layers["c1"].affine is not None and layers["c1"].affine.kind == "Mul"
    assert layers["c1"].affine.shift is not None
    assert layers["c2"].affine is None


def test_reshape_and_cast_before_opset_6_on_a_weight_path() -> None:
    """Opset 4: Reshape takes ``shape`` as an attribute and Cast names its type ("FLOAT"); the weight behind them is
    read and its planted channel zeroed in the stored (flat, float64) tensor."""
    g = Graph(4)
    flat = g.init("W_flat", planted().reshape(-1), np.float64)
    g.node("Reshape", [flat], ["W64"], shape=[K, 3, 3, 3])
    g.node("Cast", ["W64"], ["W"], to="FLOAT")
    g.node("Conv", ["x", "W"], ["c1"], pads=[1, 1, 1, 1])
    g.node("Relu", ["c1"], ["y"])
    m = g.model([1, 3, 5, 5], {"y": [1, K, 5, 5]}, 3, True)
    out, rep = onnxclp.sanitize(m, u=U)
    assert rep.layers[0].pruned == [BAD] and rep.layers[0].weight == "W_flat"
    stored = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W_flat")).reshape(K, -1)
    assert np.all(stored[BAD] == 0) and np.all(stored[[c for c in range(K) if c != BAD]] != 0)


def test_unsqueeze_with_axes_attribute_is_not_refused() -> None:
    """The ONNX Model Zoo's DenseNet-121 at opset 9: Unsqueeze with ``axes`` as an attribute (one input)."""
    m = caffe2_block(9, 3, True)
    GraphIndex.of(m)
    with pytest.raises(OnnxclpError, match="lacks a required input"):
        GraphIndex(m.graph, opset=13)  # the same node read at opset 13 lacks its axes input


# ---------------------------------------------------------------------------------------------------------------
# The ONNX Model Zoo's classics as the onnx package ships them (opset 9, IR version 3), given random weights
# ---------------------------------------------------------------------------------------------------------------

_LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def realize(path: str) -> onnx.ModelProto:
    """The light model with its ConstantOfShape placeholders replaced by random initializers (graph inputs, as IR
    version 3 requires)."""
    rng = np.random.default_rng(0)
    m = onnx.load(path)
    g = m.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    nodes, new, gone = [], [], set()
    for n in g.node:
        if n.op_type != "ConstantOfShape":
            nodes.append(n)
            continue
        shape = [int(d) for d in shapes[n.input[0]]]
        low = n.output[0].lower()
        if "var" in low or "riv" in low:
            v = rng.uniform(0.5, 1.5, shape)
        elif len(shape) <= 1:
            v = rng.normal(1.0 if ("scale" in low or "_s_" in low or "bn_w" in low) else 0.0, 0.05, shape)
        else:
            v = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        new.append(numpy_helper.from_array(f32(v), n.output[0]))
        gone.add(n.input[0])
    del g.node[:]
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in gone]
    del g.initializer[:]
    g.initializer.extend(kept + new)
    inputs = [i for i in g.input if i.name not in gone]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new]
    del g.input[:]
    g.input.extend(inputs)
    return m


@pytest.mark.skipif(not os.path.isdir(_LIGHT), reason="this onnx package ships no light test models")
@pytest.mark.parametrize(("name", "judge"), [("squeezenet", True), ("shufflenet", True), ("densenet121", False)])
def test_model_zoo_classics(name: str, judge: bool, tmp_path: Path) -> None:
    """SqueezeNet (1x1 conv classifier behind Relu and pool), ShuffleNet (Sum, grouped convs), DenseNet-121 (opset
    9 Unsqueeze, Caffe2's BN + scale): every initializer a graph input. onnxruntime judges the two small ones."""
    (path,) = glob.glob(os.path.join(_LIGHT, f"light_{name}.onnx"))
    m = realize(path)
    assert (m.ir_version, m.opset_import[0].version) == (3, 9)
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    out, rep = onnxclp.sanitize(src, method="clp")  # from the file: the safe loader's checks run
    assert rep.layers and rep.initializer_inputs and rep.pruned_channels
    assert not any("graph input" in s.reason for s in rep.skipped)
    lpp = onnxclp.scan(m, method="lpp")
    (clf,) = [layer for layer in lpp.layers if layer.role == "output"]
    assert not clf.pruned
    if judge:
        weights = {t.name for t in m.graph.initializer}
        (data,) = [i for i in m.graph.input if i.name not in weights]
        feeds = {data.name: x_of([d.dim_value for d in data.type.tensor_type.shape.dim])}
        run(out, feeds)
        same, _ = onnxclp.sanitize(m, method="clp", u=100.0)
        assert_unchanged(m, same, feeds)
