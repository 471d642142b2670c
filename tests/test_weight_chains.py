"""Weights behind Transpose, Reshape, Cast and DequantizeLinear (QDQ) nodes, edited in their stored form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import init, model, run
from onnx import helper, numpy_helper

import onnxclp

RNG = np.random.default_rng(7)


def _w(k=8, c=3, hot=5):
    w = RNG.normal(size=(k, c, 3, 3)).astype(np.float32)
    w[hot] *= 20
    return w


def _conv_relu(weight_nodes, inits, k=8):
    nodes = [
        *weight_nodes,
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", k, 5, 5])], inits)


def _check_zeroed(m, out, hot=5, k=8):
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    (before,) = run(m, {"x": x}, ["c"])
    (after,) = run(out, {"x": x}, ["c"])
    keep = [i for i in range(k) if i != hot]
    assert np.all(after[:, hot] == 0)
    np.testing.assert_allclose(after[:, keep], before[:, keep], rtol=1e-6, atol=1e-6)


def test_transpose_of_a_constant_kernel():
    w = _w()
    stored = np.transpose(w, (2, 3, 1, 0))  # HWIO, as TensorFlow keeps kernels
    m = _conv_relu([helper.make_node("Transpose", ["K"], ["Wc"], perm=[3, 2, 0, 1])], [init("K", stored)])
    out, rep = onnxclp.sanitize(m, u=2.0)
    assert rep.layers[0].pruned == [5] and rep.layers[0].weight == "K"
    k = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "K"))
    assert k.shape == stored.shape and np.all(k[..., 5] == 0)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]
    _check_zeroed(m, out)


def test_reshape_of_a_constant_kernel():
    w = _w()
    m = _conv_relu(
        [helper.make_node("Reshape", ["K", "shape"], ["Wc"])],
        [init("K", w.reshape(8, -1)), numpy_helper.from_array(np.array([8, 3, 3, 3], np.int64), "shape")],
    )
    out, rep = onnxclp.sanitize(m, u=2.0)
    assert rep.layers[0].pruned == [5]
    _check_zeroed(m, out)


def test_float16_kernel_behind_cast():
    w = _w()
    k16 = numpy_helper.from_array(w.astype(np.float16), "K")
    m = _conv_relu([helper.make_node("Cast", ["K"], ["Wc"], to=onnx.TensorProto.FLOAT)], [k16])
    out, rep = onnxclp.sanitize(m, u=2.0)
    assert rep.layers[0].pruned == [5]
    t = next(t for t in out.graph.initializer if t.name == "K")
    assert t.data_type == onnx.TensorProto.FLOAT16 and np.all(numpy_helper.to_array(t)[5] == 0)
    _check_zeroed(m, out)


def _qdq(w):
    scale = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    zp = np.arange(8, dtype=np.int8) - 4  # non-zero zero points, so "zero" is not the integer 0
    q = np.clip(np.round(w / scale[:, None, None, None]) + zp[:, None, None, None], -128, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wc"], axis=0)]
    inits = [numpy_helper.from_array(q, "Wq"), init("Ws", scale), numpy_helper.from_array(zp, "Wz")]
    return nodes, inits, q, scale, zp


def test_qdq_per_channel_zeroed_channel_gets_its_zero_point():
    nodes, inits, q, _, zp = _qdq(_w())
    m = _conv_relu(nodes, inits)
    out, rep = onnxclp.sanitize(m, u=2.0)
    assert rep.layers[0].pruned == [5]
    qo = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "Wq"))
    assert qo.dtype == np.int8 and np.all(qo[5] == zp[5])
    np.testing.assert_array_equal(np.delete(qo, 5, axis=0), np.delete(q, 5, axis=0))
    _check_zeroed(m, out)


def test_qdq_rescale_changes_the_per_channel_scale():
    w = np.ones((8, 3, 3, 3), dtype=np.float32)
    w[6] *= 1.8  # inside LPP's rescale band with the parameters below
    w[5] *= 6.0  # above the upper threshold
    nodes, inits, q, scale, _ = _qdq(w)
    m = _conv_relu(nodes, inits)
    out, rep = onnxclp.sanitize(m, method="lpp", u=2.0, u_low=-10.0, bias_rate=2.5)
    layer = rep.layers[0]
    assert layer.pruned == [5] and 6 in layer.rescaled
    inits_out = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for k, c in layer.rescaled.items():
        np.testing.assert_allclose(inits_out["Ws"][k], scale[k] * c, rtol=1e-6)
        np.testing.assert_array_equal(inits_out["Wq"][k], q[k])  # integers untouched


def _fake_quant(w, shared_scale=True):
    """A float weight fake-quantised as quantisation-aware training exports it: W -> QuantizeLinear ->
    DequantizeLinear -> Conv, per channel, non-zero zero points; one scale for both nodes, or a copy each."""
    scale = (np.abs(w).reshape(8, -1).max(axis=1) / 100).astype(np.float32)
    zp = np.arange(8, dtype=np.int8) - 4
    qs = "Ws" if shared_scale else "Ws_q"
    nodes = [
        helper.make_node("QuantizeLinear", ["W", qs, "Wz"], ["Wq"], axis=0),
        helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["Wc"], axis=0),
    ]
    inits = [init("W", w), init("Ws", scale), numpy_helper.from_array(zp, "Wz")]
    if not shared_scale:
        inits.append(init("Ws_q", scale))
    return nodes, inits, scale


@pytest.mark.parametrize("shared_scale", [True, False])
def test_fake_quantised_float_weight_is_read_and_edited(shared_scale):
    """QuantizeLinear in a weight's chain (session 20; before: 'not a constant', no layer scored): CLP reads the
    fake-quantised values and zeroes a channel exactly; LPP's rescaled channel gets its scale multiplied, the
    float weight of an unchanged integer stays as stored, and onnxruntime's outputs are the edit's."""
    w = _w()
    nodes, inits, _ = _fake_quant(w, shared_scale)
    m = _conv_relu(nodes, inits)
    out, rep = onnxclp.sanitize(m, u=2.0)
    assert rep.layers[0].pruned == [5] and rep.layers[0].weight == "W"
    wo = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "W"))
    assert np.all(wo[5] == 0)
    np.testing.assert_array_equal(np.delete(wo, 5, axis=0), np.delete(w, 5, axis=0))
    _check_zeroed(m, out)
    w = np.ones((8, 3, 3, 3), dtype=np.float32)
    w[6] *= 1.8
    w[5] *= 6.0
    nodes, inits, _ = _fake_quant(w, shared_scale)
    m = _conv_relu(nodes, inits)
    out, rep = onnxclp.sanitize(m, method="lpp", u=2.0, u_low=-10.0, bias_rate=2.5)
    layer = rep.layers[0]
    assert layer.pruned == [5] and 6 in layer.rescaled
    x = RNG.normal(size=(2, 3, 5, 5)).astype(np.float32)
    (before,) = run(m, {"x": x}, ["c"])
    (after,) = run(out, {"x": x}, ["c"])
    assert np.all(after[:, 5] == 0)
    for k in range(8):
        if k != 5:
            c = layer.rescaled.get(k, 1.0)
            np.testing.assert_allclose(after[:, k], before[:, k] * c, rtol=1e-5, atol=1e-5)
    # a rescaled channel keeps its stored floats (so its integers): its scale moves
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_array_equal(stored["W"][6], w[6])


def test_shared_qdq_weight_is_materialised_for_the_edited_layer_only():
    nodes, inits, q, _, _ = _qdq(_w())
    nodes += [
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wc"], ["c2"], name="other", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "c2"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    m = model(nodes, [("x", ["N", 3, 5, 5])], [("y", ["N", 8, 5, 5])], inits)
    out, rep = onnxclp.sanitize(m, u=2.0, exclude=["other"])
    assert rep.copied_tensors and rep.layers[0].pruned == [5]
    x = RNG.normal(size=(1, 3, 5, 5)).astype(np.float32)
    c, c2 = run(out, {"x": x}, ["c", "c2"])
    b, b2 = run(m, {"x": x}, ["c", "c2"])
    np.testing.assert_array_equal(c2, b2)
    assert np.all(c[:, 5] == 0)
    np.testing.assert_allclose(np.delete(c, 5, axis=1), np.delete(b, 5, axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "Wq")), q)


@pytest.mark.parametrize("per_channel", [True, False])
def test_onnxruntime_quantize_static_model(tmp_path, per_channel):
    """A QDQ model made by onnxruntime.quantization.quantize_static: layers found and pruned in int8."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    w = _w(k=16, hot=11)
    b = RNG.normal(size=16).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="head"),
    ]
    inits = [init("W", w), init("B", b), init("W2", RNG.normal(size=(4, 16, 1, 1)))]
    fp32 = model(nodes, [("x", [1, 3, 5, 5])], [("y", [1, 4, 5, 5])], inits, opset=17)
    src, qpath = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(fp32, str(src))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": RNG.normal(size=(1, 3, 5, 5)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.data, None)

    quantize_static(
        str(src),
        str(qpath),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
    )
    qmodel = onnx.load(str(qpath))
    assert "DequantizeLinear" in [n.op_type for n in qmodel.graph.node]
    out, rep = onnxclp.sanitize(qmodel, u=3.0)
    layer = next(layer for layer in rep.layers if layer.node == "conv")
    assert 11 in layer.pruned
    x = RNG.normal(size=(1, 3, 5, 5)).astype(np.float32)
    conv = next(n for n in out.graph.node if n.name == "conv")
    (c,) = run(out, {"x": x}, [conv.output[0]])
    assert np.all(c[:, layer.pruned] == 0)
    # Weights stay int8.
    dq = next(n for n in out.graph.node if n.output[0] == conv.input[1])
    assert dq.op_type == "DequantizeLinear"
