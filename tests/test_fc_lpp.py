"""Fully connected layers and LPP (docs/algorithms.md, "Channels" and "LPP") on onnx.helper graphs and torch exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from builders import conv_bn, init, model, run
from onnx import helper

import onnxclp

RNG = np.random.default_rng(3)


def _x(shape):
    return RNG.normal(size=shape).astype(np.float32)


def _fc_weight(out_f: int, in_f: int, hot: int) -> np.ndarray:
    w = _x((out_f, in_f))  # rows = output neurons
    w[hot] *= 20
    return w


def _mlp(first: list[onnx.NodeProto], inits: list, hidden: str = "h") -> onnx.ModelProto:
    """first layer(s) producing ``hidden`` (8 neurons) -> Relu -> Gemm classifier (3 classes) -> y."""
    nodes = [
        *first,
        helper.make_node("Relu", [hidden], ["r"]),
        helper.make_node("Gemm", ["r", "Wc", "bc"], ["y"], name="classifier", transB=1),
    ]
    inits = [*inits, init("Wc", _x((3, 8))), init("bc", _x((3,)))]
    return model(nodes, [("x", ["N", 5])], [("y", ["N", 3])], inits)


def _check_fc_pruned(m, out, name="h", hot=6):
    x = _x((4, 5))
    (before,) = run(m, {"x": x}, [name])
    (after,) = run(out, {"x": x}, [name])
    keep = [i for i in range(8) if i != hot]
    assert np.all(after[:, hot] == 0)
    np.testing.assert_array_equal(after[:, keep], before[:, keep])


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b(trans_b):
    w = _fc_weight(8, 5, hot=6)
    stored = w if trans_b else w.T
    m = _mlp(
        [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc1", transB=trans_b, alpha=2.0)],
        [init("W", stored), init("b", _x((8,)))],
    )
    rep = onnxclp.scan(m, include_fc=True, u=2.0)
    fc1 = next(layer for layer in rep.layers if layer.node == "fc1")
    np.testing.assert_allclose(fc1.scores, 2.0 * np.linalg.norm(w, axis=1), rtol=1e-5)
    assert fc1.pruned == [6] and fc1.role == "hidden"
    out, _ = onnxclp.sanitize(m, include_fc=True, u=2.0)
    _check_fc_pruned(m, out)


def test_clp_skips_fc_by_default_with_reason():
    m = _mlp([helper.make_node("Gemm", ["x", "W"], ["h"], name="fc1", transB=1)], [init("W", _fc_weight(8, 5, 6))])
    from onnxclp.errors import NothingToSanitize

    with pytest.raises(NothingToSanitize, match="fully connected"):
        onnxclp.scan(m)


@pytest.mark.parametrize("order", ["xw", "wx"])
@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_both_orders(order, bias_first):
    w = _fc_weight(8, 5, hot=6)
    if order == "xw":  # MatMul(X, W[in, out])
        mm = helper.make_node("MatMul", ["x", "W"], ["mm"], name="fc1")
        inits = [init("W", w.T)]
    else:  # MatMul(W[out, in], X^T) -> (out, N), transposed back
        mm = helper.make_node("MatMul", ["W", "xt"], ["mmt"], name="fc1")
        inits = [init("W", w)]
    add_in = ["b", "mm"] if bias_first else ["mm", "b"]
    nodes = [helper.make_node("Add", add_in, ["h"], name="bias")]
    if order == "xw":
        nodes = [mm, *nodes]
        inits.append(init("b", _x((8,))))
    else:
        nodes = [
            helper.make_node("Transpose", ["x"], ["xt"]),
            mm,
            helper.make_node("Add", ["b", "mmt"] if bias_first else ["mmt", "b"], ["ht"], name="bias"),
            helper.make_node("Transpose", ["ht"], ["h"]),
        ]
        inits.append(init("b", _x((8, 1))))
    m = _mlp(nodes, inits)
    rep = onnxclp.scan(m, method="lpp", u=2.0, u_low=-100.0, bias_rate=0.0)
    fc1 = next(layer for layer in rep.layers if layer.node == "fc1")
    np.testing.assert_allclose(fc1.scores, np.linalg.norm(w, axis=1), rtol=1e-5)
    assert fc1.pruned == [6]
    out, _ = onnxclp.sanitize(m, method="lpp", u=2.0, u_low=-100.0, bias_rate=0.0)
    _check_fc_pruned(m, out)


def test_bn_after_gemm_is_paired_and_fused():
    w = _fc_weight(8, 5, hot=6)
    gamma = RNG.uniform(0.5, 1.5, 8).astype(np.float32)
    bn = helper.make_node("BatchNormalization", ["g", "gm", "bt", "mu", "var"], ["h"], name="bn")
    m = _mlp(
        [helper.make_node("Gemm", ["x", "W", "b"], ["g"], name="fc1", transB=1), bn],
        [
            init("W", w),
            init("b", _x((8,))),
            init("gm", gamma),
            init("bt", _x((8,))),
            init("mu", _x((8,))),
            init("var", np.ones(8)),
        ],
    )
    rep = onnxclp.scan(m, include_fc=True, u=2.0)
    fc1 = next(layer for layer in rep.layers if layer.node == "fc1")
    assert fc1.affine == "bn"
    np.testing.assert_allclose(fc1.scores, np.linalg.norm(w, axis=1) * gamma / np.sqrt(1 + 1e-5), rtol=1e-5)
    out, rep2 = onnxclp.sanitize(m, include_fc=True, u=100.0, fuse_bn=True)
    assert rep2.fused_batchnorms == 1 and "BatchNormalization" not in [n.op_type for n in out.graph.node]
    x = _x((3, 5))
    np.testing.assert_allclose(run(out, {"x": x})[0], run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_classifier_is_protected_and_topk_applies():
    m = _mlp([helper.make_node("Gemm", ["x", "W"], ["h"], name="fc1", transB=1)], [init("W", _fc_weight(8, 5, 6))])
    wc = np.zeros((3, 8), dtype=np.float32)
    wc[2] = [0.1, 5.0, 0.2, 4.0, 0.3, 0.4, 0.5, 0.6]  # class 2 has the largest mean
    for t in m.graph.initializer:
        if t.name == "Wc":
            t.CopyFrom(init("Wc", wc))
    out, rep = onnxclp.sanitize(m, method="lpp", u=0.5, u_low=-0.5, bias_rate=0.2, topk=2, force=True)
    cls = next(layer for layer in rep.layers if layer.node == "classifier")
    assert cls.role == "output" and cls.pruned == [] and cls.rescaled == {}
    assert cls.topk_target == 2 and cls.topk_zeroed == [1, 3]
    new_wc = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "Wc")
    expected = wc.copy()
    expected[2, [1, 3]] = 0
    np.testing.assert_array_equal(new_wc, expected)
    # CLP never touches the classifier, even with --include-fc.
    rep_clp = onnxclp.scan(m, include_fc=True, u=0.1, force=True)
    assert next(layer for layer in rep_clp.layers if layer.node == "classifier").pruned == []


def test_lpp_rescale_scales_kernel_only():
    w = np.ones((6, 2, 1, 1), dtype=np.float32)
    w[:, 0, 0, 0] = [1.0, 1.0, 1.0, 1.0, 1.6, 4.0]
    bias = _x((6,))
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"])]
    m = model(nodes, [("x", [1, 2, 3, 3])], [("y", [1, 6, 3, 3])], [init("W", w), init("B", bias)])
    scores = np.linalg.norm(w.reshape(6, -1), axis=1)
    mean, sd = scores.mean(), scores.std(ddof=1)
    u = (scores[5] - mean) / sd - 1e-6  # channel 5 just above the upper threshold: pruned
    b = u - (scores[4] - mean) / sd + 1e-6  # channel 4 just inside the band: rescaled
    out, rep = onnxclp.sanitize(m, method="lpp", u=u, u_low=-10.0, bias_rate=b)
    (layer,) = rep.layers
    assert layer.pruned == [5] and list(layer.rescaled) == [4]
    c = mean / scores[4]
    np.testing.assert_allclose(layer.rescaled[4], c)
    x = _x((1, 2, 3, 3))
    (before,) = run(m, {"x": x}, ["c"])
    (after,) = run(out, {"x": x}, ["c"])
    np.testing.assert_allclose(after[:, 4] - bias[4], c * (before[:, 4] - bias[4]), rtol=1e-5, atol=1e-6)
    assert np.all(after[:, 5] == 0)
    np.testing.assert_array_equal(after[:, :4], before[:, :4])
    new_b = next(onnx.numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "B")
    np.testing.assert_array_equal(new_b[:5], bias[:5])  # biases of kept and rescaled channels untouched


def test_lpp_with_unfused_bn_rescales_conv_kernel_only():
    w = np.ones((6, 2, 1, 1), dtype=np.float32)
    w[:, 0, 0, 0] = [1.0, 1.0, 1.0, 1.0, 2.5, 4.0]
    m = conv_bn(w, gamma=np.ones(6), beta=np.full(6, 0.3))
    out, rep = onnxclp.sanitize(m, method="lpp", u=1.5, u_low=-10.0, bias_rate=1.0)
    assert rep.layers[0].pruned == [5] and list(rep.layers[0].rescaled) == [4]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for k, c in rep.layers[0].rescaled.items():
        np.testing.assert_allclose(inits["W"][k], w[k] * c, rtol=1e-6)
    np.testing.assert_array_equal(inits["mean"], np.zeros(6))  # BN statistics untouched


def test_lpp_on_equal_channels_prunes_nothing():
    w = np.ones((8, 3, 3, 3), dtype=np.float32)
    _, rep = onnxclp.sanitize(conv_bn(w, gamma=np.ones(8)), method="lpp")
    assert rep.pruned_channels == 0 and rep.rescaled_channels == 0


class _MLPHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_linear_in_middle_and_end(dynamo, tmp_path):
    torch.manual_seed(0)
    net = _MLPHead().eval()
    with torch.no_grad():
        net.fc1.weight[7] *= 30
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=dynamo, input_names=["x"])
    out_path = tmp_path / "out.onnx"
    rep = onnxclp.sanitize_file(path, out_path, method="lpp", u=3.0, topk=3)
    fcs = [layer for layer in rep.layers if layer.op in ("Gemm", "MatMul")]
    assert [layer.role for layer in fcs] == ["hidden", "output"]
    assert 7 in fcs[0].pruned
    assert fcs[1].pruned == [] and len(fcs[1].topk_zeroed) == 3
    # The sanitized model equals the torch model with the same edits.
    with torch.no_grad():
        net.fc1.weight[fcs[0].pruned] = 0
        net.fc1.bias[fcs[0].pruned] = 0
        for k, c in fcs[0].rescaled.items():
            net.fc1.weight[int(k)] *= c
        net.fc2.weight[fcs[1].topk_target, fcs[1].topk_zeroed] = 0
        conv = rep.layers[0]
        for k in conv.pruned:
            net.bn.weight[k] = 0
            net.bn.bias[k] = 0
        for k, c in conv.rescaled.items():
            net.conv.weight[int(k)] *= c
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 8, 8)
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), atol=1e-4)
