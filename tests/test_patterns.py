"""Layer patterns on graphs built with onnx.helper: pairing, weights, edits (docs/algorithms.md, "Channels",
"Editing").

onnxruntime is the judge: a pruned channel's output before the activation must be exactly 0, every other
channel unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import conv_bn, init, model, run
from onnx import TensorProto, helper

import onnxclp
from onnxclp.errors import NothingToSanitize

RNG = np.random.default_rng(0)


def _x(shape):
    return RNG.normal(size=shape).astype(np.float32)


def _hand_conv_bn():
    # 1x1 kernels: channel score = |gamma / sqrt(var + eps)| * ||W_k||.
    w = np.array([[3, 4], [1, 0], [0, 2], [6, 8]], dtype=np.float32).reshape(4, 2, 1, 1)
    return conv_bn(w, gamma=[1, 1, -1, 1], var=[3, 0, 0, 3], eps=1.0, beta=[0.1, 0.2, 0.3, 0.4])


def test_bn_pairing_scores_and_exact_zero():
    m = _hand_conv_bn()
    rep = onnxclp.scan(m, u=1.0)
    (layer,) = rep.layers
    assert layer.affine == "bn" and layer.channels == 4
    np.testing.assert_allclose(layer.scores, [2.5, 1.0, 2.0, 5.0], rtol=1e-6)
    assert layer.pruned == [3]
    out, _ = onnxclp.sanitize(m, u=1.0)
    x = _x((2, 2, 6, 6))
    (before,) = run(m, {"x": x}, ["b"])
    (after,) = run(out, {"x": x}, ["b"])
    assert np.all(after[:, 3] == 0.0)
    np.testing.assert_array_equal(after[:, :3], before[:, :3])
    # Only BN gamma and beta changed; the Conv weight is untouched.
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(inits["W"], onnx.numpy_helper.to_array(m.graph.initializer[0]))
    assert inits["gamma"][3] == 0 and inits["beta"][3] == 0


def test_bn_after_conv_with_two_consumers_is_not_paired():
    m = _hand_conv_bn()
    m.graph.node.append(helper.make_node("Relu", ["c"], ["c2"], name="other"))
    m.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    rep = onnxclp.scan(m, u=1.0)
    (layer,) = rep.layers
    assert layer.affine is None
    np.testing.assert_allclose(layer.scores, [5.0, 1.0, 2.0, 10.0], rtol=1e-6)


def _conv_mul_add(mul_shape, add_shape, swap=False):
    w = _x((4, 3, 3, 3))
    s = np.array([1.0, 2.0, 0.5, 10.0], dtype=np.float32)
    t = np.array([0.1, -0.2, 0.3, 0.4], dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["S", "c"] if swap else ["c", "S"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "T"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    inits = [init("W", w), init("B", _x((4,))), init("S", s.reshape(mul_shape)), init("T", t.reshape(add_shape))]
    return model(nodes, [("x", [1, 3, 5, 5])], [("y", None)], inits), w, s


@pytest.mark.parametrize(
    ("mul_shape", "add_shape", "swap"), [((4, 1, 1), (1, 4, 1, 1), False), ((1, 4, 1, 1), (4, 1, 1), True)]
)
def test_mul_add_affine(mul_shape, add_shape, swap):
    m, w, s = _conv_mul_add(mul_shape, add_shape, swap)
    rep = onnxclp.scan(m, u=1.0)
    (layer,) = rep.layers
    assert layer.affine == "mul, add"
    ref = [np.linalg.svd(w[k].reshape(3, -1), compute_uv=False)[0] * abs(s[k]) for k in range(4)]
    np.testing.assert_allclose(layer.scores, ref, rtol=1e-5)
    assert layer.pruned == [3]
    out, _ = onnxclp.sanitize(m, u=1.0)
    x = _x((1, 3, 5, 5))
    (before,) = run(m, {"x": x}, ["a"])
    (after,) = run(out, {"x": x}, ["a"])
    assert np.all(after[:, 3] == 0) and np.array_equal(after[:, :3], before[:, :3])


def test_mul_by_scalar_is_not_an_affine():
    m, _, _ = _conv_mul_add((4, 1, 1), (4, 1, 1))
    for t in m.graph.initializer:
        if t.name == "S":
            t.CopyFrom(init("S", [2.0]))
    assert onnxclp.scan(m, u=1.0).layers[0].affine is None


def _two_convs_sharing(w):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c1"], name="conv1"),
        helper.make_node("Conv", ["x", "W"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c1", "c2"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    return model(nodes, [("x", [1, 2, 4, 4])], [("y", [1, w.shape[0], 4, 4])], [init("W", w)])


def test_shared_weight_is_copied_before_edit():
    w = np.ones((5, 2, 1, 1), dtype=np.float32)
    w[2] *= 20
    m = _two_convs_sharing(w)
    out, rep = onnxclp.sanitize(m, u=1.0, exclude=["conv2"])
    assert [layer.pruned for layer in rep.layers] == [[2]]
    assert rep.copied_tensors == ["W_onnxclp"]
    x = _x((1, 2, 4, 4))
    c1, c2 = run(out, {"x": x}, ["c1", "c2"])
    b1, b2 = run(m, {"x": x}, ["c1", "c2"])
    np.testing.assert_array_equal(c2, b2)  # conv2 keeps the original weight
    assert np.all(c1[:, 2] == 0) and np.array_equal(c1[:, [0, 1, 3, 4]], b1[:, [0, 1, 3, 4]])
    names = [t.name for t in out.graph.initializer]
    assert names == ["W", "W_onnxclp"]  # original order kept, the copy appended
    onnx.checker.check_model(out, full_check=True)


def test_shared_weight_pruned_in_both_users():
    w = np.ones((5, 2, 1, 1), dtype=np.float32)
    w[2] *= 20
    # both users write the same sum: --streams all keeps both prunes (strongest would keep one, by design)
    out, rep = onnxclp.sanitize(_two_convs_sharing(w), u=1.0, streams="all")
    assert [layer.pruned for layer in rep.layers] == [[2], [2]]
    (y,) = run(out, {"x": _x((1, 2, 4, 4))})
    assert np.all(y[:, 2] == 0)


def test_graph_input_weight_is_scored_and_listed():
    """Issue 19: an initializer that is also a graph input (IR 3, keep_initializers_as_inputs) is a weight: it
    is scored like any other and stays a graph input (tests/test_compat_opsets.py edits and checks it)."""
    m = _two_convs_sharing(np.ones((3, 2, 1, 1), dtype=np.float32))
    m.graph.input.append(helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [3, 2, 1, 1]))
    rep = onnxclp.scan(m)
    assert rep.layers and all(layer.weight == "W" for layer in rep.layers)
    assert not any("graph input" in s.reason for s in rep.skipped)


def test_constant_node_and_identity_chain_weights():
    w = np.ones((4, 2, 1, 1), dtype=np.float32)
    w[1] *= 30
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=onnx.numpy_helper.from_array(w, "wc")),
        helper.make_node("Identity", ["Wc"], ["Wi"]),
        helper.make_node("Conv", ["x", "Wi"], ["y"], name="conv"),
    ]
    m = model(nodes, [("x", [1, 2, 3, 3])], [("y", None)])
    m.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    m.graph.output[0].name = "z"
    out, rep = onnxclp.sanitize(m, u=1.0)
    assert rep.layers[0].pruned == [1]
    (y,) = run(out, {"x": _x((1, 2, 3, 3))}, ["y"])
    assert np.all(y[:, 1] == 0) and np.all(y[:, [0, 2, 3]] != 0)
    assert len(out.graph.initializer) == 0  # edited in place inside the Constant node


@pytest.mark.parametrize(("group", "cin", "cout"), [(2, 4, 6), (4, 4, 4), (3, 3, 9)])
def test_grouped_and_depthwise_conv(group, cin, cout):
    w = _x((cout, cin // group, 3, 3))
    w[cout - 1] *= 25
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", group=group, pads=[1, 1, 1, 1])]
    m = model(nodes, [("x", [1, cin, 5, 5])], [("y", None)], [init("W", w)])
    m.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    m.graph.output[0].name = "z"
    rep = onnxclp.scan(m, u=1.4)
    ref = [np.linalg.svd(w[k].reshape(cin // group, -1), compute_uv=False)[0] for k in range(cout)]
    np.testing.assert_allclose(rep.layers[0].scores, ref, rtol=1e-5)
    assert cout - 1 in rep.layers[0].pruned
    out, _ = onnxclp.sanitize(m, u=1.4)
    (y,) = run(out, {"x": _x((1, cin, 5, 5))}, ["y"])
    assert np.all(y[:, rep.layers[0].pruned] == 0)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    cin, cout_g = 4, 6
    w = _x((cin, cout_g, 2, 2))  # output channels: group * cout_g
    w[:2, 1] *= 30  # output channel 1 of group 0
    b = _x((group * cout_g,))
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="deconv", group=group, strides=[2, 2])]
    m = model(nodes, [("x", [1, cin, 3, 3])], [("y", None)], [init("W", w), init("B", b)])
    m.graph.node.append(helper.make_node("Relu", ["y"], ["z"]))
    m.graph.output[0].name = "z"
    rep = onnxclp.scan(m, u=1.5)
    ref = []
    for oc in range(group * cout_g):
        j, local = divmod(oc, cout_g)
        wk = w[j * cin // group : (j + 1) * cin // group, local]
        ref.append(np.linalg.svd(wk.reshape(cin // group, -1), compute_uv=False)[0])
    np.testing.assert_allclose(rep.layers[0].scores, ref, rtol=1e-5)
    assert rep.layers[0].pruned == [1]
    out, _ = onnxclp.sanitize(m, u=1.5)
    x = _x((1, cin, 3, 3))
    (y,) = run(out, {"x": x}, ["y"])
    (y0,) = run(m, {"x": x}, ["y"])
    keep = [c for c in range(group * cout_g) if c != 1]
    assert np.all(y[:, 1] == 0) and np.array_equal(y[:, keep], y0[:, keep])


@pytest.mark.parametrize("spatial", [(9,), (4, 4, 4)])
def test_1d_and_3d_conv(spatial):
    nd = len(spatial)
    w = _x((6, 2) + (3,) * nd)
    w[4] *= 40
    m = conv_bn(w, gamma=np.ones(6), spatial=spatial)
    out, rep = onnxclp.sanitize(m, u=1.5)
    assert rep.layers[0].pruned == [4]
    (b,) = run(out, {"x": _x((1, 2, *spatial))}, ["b"])
    assert np.all(b[:, 4] == 0) and np.all(b[:, :4] != 0)


def test_fuse_bn_matches_unfused_outputs():
    w = _x((8, 3, 3, 3))
    m = conv_bn(
        w, gamma=RNG.uniform(0.5, 2, 8), beta=_x((8,)), mean=_x((8,)), var=RNG.uniform(0.5, 2, 8), bias=_x((8,))
    )
    out, rep = onnxclp.sanitize(m, u=100.0, fuse_bn=True)
    assert rep.fused_batchnorms == 1 and rep.pruned_channels == 0
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu"]
    assert {t.name for t in out.graph.initializer} == {"W", "B"}
    x = _x((2, 3, 6, 6))
    np.testing.assert_allclose(run(out, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(out, full_check=True)


def test_fuse_then_prune_equals_prune_unfused():
    w = np.ones((6, 2, 1, 1), dtype=np.float32)
    w[5] *= 10
    m = conv_bn(w, gamma=np.ones(6), beta=np.full(6, 0.5))
    a, ra = onnxclp.sanitize(m, u=1.5, fuse_bn=True)
    b, rb = onnxclp.sanitize(m, u=1.5)
    assert [layer.pruned for layer in ra.layers] == [layer.pruned for layer in rb.layers] == [[5]]
    x = _x((1, 2, 6, 6))
    np.testing.assert_allclose(run(a, {"x": x})[0], run(b, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_nothing_to_sanitize():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1, 3])], [("y", None)])
    with pytest.raises(NothingToSanitize):
        onnxclp.sanitize(m)


def test_sanitize_does_not_modify_a_model_passed_in_memory():
    m = _hand_conv_bn()
    before = m.SerializeToString()
    onnxclp.sanitize(m, u=1.0)
    assert m.SerializeToString() == before


def test_layers_in_subgraphs_and_functions_are_reported_as_skipped():
    w = np.ones((4, 2, 1, 1), dtype=np.float32)
    w[1] *= 30
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["b_out"], name="inner_conv")],
        "then",
        [],
        [helper.make_empty_tensor_value_info("b_out")],
    )
    fn = helper.make_function(
        "local",
        "ConvFn",
        ["a", "k"],
        ["o"],
        [helper.make_node("Conv", ["a", "k"], ["o"], name="fn_conv")],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("If", ["cond"], ["i"], name="branch", then_branch=body, else_branch=body),
        helper.make_node("ConvFn", ["x", "W"], ["f"], name="call", domain="local"),
    ]
    m = model(nodes, [("x", [1, 2, 3, 3])], [("r", [1, 4, 3, 3]), ("i", None), ("f", None)], [init("W", w)])
    m.graph.input.append(helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []))
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("local", 1))
    rep = onnxclp.scan(m, u=1.0)
    assert [layer.node for layer in rep.layers] == ["conv"]
    reasons = {s.node: s.reason for s in rep.skipped}
    assert any("inner_conv" in k and "subgraph" in v for k, v in reasons.items())
    assert any("fn_conv" in k and "function" in v for k, v in reasons.items())
    assert len(reasons) == 3  # then and else branches, and the function body


def test_exact_score_on_conv_and_strided_conv_transpose():
    from onnxclp import scores

    w = _x((6, 4, 2, 2))  # ConvTranspose weight (C_in, C_out, kh, kw)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="deconv", strides=[2, 2]),
        helper.make_node("Relu", ["y"], ["z"]),
    ]
    m = model(nodes, [("x", [1, 6, 3, 3])], [("z", [1, 4, 6, 6])], [init("W", w)])
    (layer,) = onnxclp.scan(m, score="exact").layers
    canonical = np.swapaxes(w, 0, 1)
    np.testing.assert_allclose(layer.scores, scores.exact_transposed(canonical, (3, 3), (2, 2)), rtol=1e-6)
    conv = _hand_conv_bn()
    (layer,) = onnxclp.scan(conv, score="exact", u=1.0).layers
    # 1x1 kernels: the exact norm is the spectral one, times the BN scale.
    np.testing.assert_allclose(layer.scores, [2.5, 1.0, 2.0, 5.0], rtol=1e-6)


def _resnet_with_functions(tmp_path):
    import warnings

    import torch

    from tests.torch_models import BasicBlock, SmallResNet

    net = SmallResNet(8).eval()
    with torch.no_grad():  # a planted outlier in a block's convolution (inside a function once exported)
        net.layer2.conv1.weight[3] *= 50.0
    path = tmp_path / "fn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(1, 3, 16, 16),),
            str(path),
            dynamo=False,
            export_modules_as_functions={BasicBlock},
            opset_version=17,
        )
    return path


def test_blocks_exported_as_functions_are_skipped_or_inlined(tmp_path):
    """torch's ``export_modules_as_functions``: the blocks' convolutions live in model-local functions. They are
    skipped with a reason that names ``--inline-functions``; with it, every one is scored, the planted channel
    is pruned, and the output equals sanitizing the model inlined by onnx beforehand."""
    import onnx.inliner

    from onnxclp.api import sanitize, scan

    path = _resnet_with_functions(tmp_path)
    model = onnx.load(str(path))
    before = scan(model)
    in_functions = [s for s in before.skipped if s.node.startswith("function ")]
    body_convs = sum(n.op_type == "Conv" for f in model.functions for n in f.node)
    assert len(before.layers) == 1 and len(in_functions) == body_convs == 5  # one skip per conv of each body
    assert all("--inline-functions" in s.reason for s in in_functions)

    out, report = sanitize(path, inline_functions=True)
    assert len(report.layers) == 9 and not out.functions
    assert report.inlined_functions == ["tests.torch_models.BasicBlock", "tests.torch_models.BasicBlock.1"]
    assert report.pruned_channels >= 1
    reference, ref_report = sanitize(onnx.inliner.inline_local_functions(model))
    assert [layer.pruned for layer in report.layers] == [layer.pruned for layer in ref_report.layers]
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    name = model.graph.input[0].name
    np.testing.assert_array_equal(run(out, {name: x})[0], run(reference, {name: x})[0])
    # the original, unsanitized, still computes what the inlined one does before pruning
    np.testing.assert_allclose(
        run(model, {name: x})[0], run(onnx.inliner.inline_local_functions(model), {name: x})[0], rtol=1e-5
    )


def _fn(name: str, body_calls: list[str]) -> onnx.FunctionProto:
    nodes = [helper.make_node("Relu", ["x"], ["t0"])]
    prev = "t0"
    for i, callee in enumerate(body_calls):
        nodes.append(helper.make_node(callee, [prev], [f"t{i + 1}"], domain="local"))
        prev = f"t{i + 1}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return helper.make_function(
        "local", name, ["x"], ["y"], nodes, [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    )


@pytest.mark.parametrize("case", ["recursion", "explosion", "uncalled"])
def test_inlining_refuses_hostile_functions_and_keeps_uncalled_ones(case):
    from onnxclp.passes.inline import inline_functions

    m = conv_bn(np.random.default_rng(0).standard_normal((16, 3, 3, 3)), np.ones(16))
    m.opset_import.append(helper.make_opsetid("local", 1))
    if case == "recursion":
        m.functions.extend([_fn("A", ["B"]), _fn("B", ["A"])])
    elif case == "explosion":  # each level calls the next twice: 2^30 nodes once inlined
        m.functions.extend([_fn(f"F{i}", [f"F{i + 1}", f"F{i + 1}"]) for i in range(30)] + [_fn("F30", [])])
    else:
        m.functions.append(_fn("A", []))
    if case != "uncalled":
        first = "A" if case == "recursion" else "F0"
        relu = next(n for n in m.graph.node if n.op_type == "Relu")
        relu.op_type, relu.domain = first, "local"
    if case == "uncalled":
        out, called = inline_functions(m)
        assert out is m and called == [] and len(out.functions) == 1
        assert onnxclp.scan(m, inline_functions=True).inlined_functions == []
        return
    if case == "recursion":  # the model checks refuse it first, in memory as from a file; the pass refuses it too
        with pytest.raises(onnxclp.OnnxclpError, match="ONNX forbids recursion"):
            onnxclp.scan(m, inline_functions=True)
        with pytest.raises(onnxclp.OnnxclpError, match="calls itself"):
            inline_functions(m)
        return
    with pytest.raises(onnxclp.OnnxclpError, match="expand to more"):
        onnxclp.scan(m, inline_functions=True)


def test_inline_functions_on_the_command_line(tmp_path):
    import json

    from typer.testing import CliRunner

    from onnxclp.cli import app

    path = _resnet_with_functions(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    result = CliRunner().invoke(app, ["sanitize", str(path), str(out), "--inline-functions", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "inlined 2 model-local functions" in " ".join(result.stdout.split())
    data = json.loads(report.read_text())
    assert len(data["inlined_functions"]) == 2 and data["totals"]["scored_layers"] == 9
    assert not onnx.load(str(out)).functions
