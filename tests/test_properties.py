"""Property-based tests over random small graphs (issue #7, part 2).

Hypothesis draws Conv / BatchNormalization / Gemm chains: 1-D or 2-D, random channel counts, groups (depthwise
included), kernel sizes, strides, dilations, biases, ReLUs, optionally an outlier channel, and a head of one or
two Gemm layers (the first possibly followed by a BatchNormalization). Weights come from a numpy generator
seeded by Hypothesis. The properties:

1. sanitize and scan raise nothing but :class:`OnnxclpError`, and print no warning, whatever the options;
2. with a huge ``u`` the sanitized model computes exactly what the input computes (onnxruntime, bit for bit)
   and its initializers are byte-identical;
3. every pruned channel is exactly 0 before its activation (the tensor after the layer's bias and its
   BatchNormalization, exposed as an extra graph output and run with onnxruntime);
4. ``fuse_bn=True`` and ``fuse_bn=False`` on the same model prune the same channels (and, under LPP, rescale
   the same ones).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxclp import NothingToSanitize, OnnxclpError, sanitize, scan

ort = pytest.importorskip("onnxruntime")

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Chain:
    """A generated model and, for each scored node, the tensor holding its pre-activation output."""

    model: onnx.ModelProto
    pre_activation: dict[str, str] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    seed: int = 0


@st.composite
def chains(draw) -> Chain:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nd = draw(st.sampled_from([1, 2]))
    size = draw(st.integers(4, 9))
    channels = draw(st.integers(1, 4))
    x_shape = (2, channels, *([size] * nd))
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    pre: dict[str, str] = {}
    prev = "x"

    def tensor(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def bn(prefix: str, k: int, src: str) -> str:
        names = [
            tensor(f"{prefix}.gamma", rng.uniform(0.3, 2.0, k)),
            tensor(f"{prefix}.beta", rng.standard_normal(k)),
            tensor(f"{prefix}.mean", rng.standard_normal(k) * 0.1),
            tensor(f"{prefix}.var", rng.uniform(0.5, 2.0, k)),
        ]
        eps = draw(st.sampled_from([1e-5, 1e-3]))
        nodes.append(helper.make_node("BatchNormalization", [src, *names], [f"{prefix}.out"], name=prefix, epsilon=eps))
        return f"{prefix}.out"

    for i in range(draw(st.integers(1, 3))):
        c = channels
        divisors = [g for g in range(1, c + 1) if c % g == 0]
        group = draw(st.sampled_from(divisors))
        k = group * draw(st.integers(1, 16 // group if group <= 16 else 1))
        k = max(k, 2)
        if k % group:
            k = group * 2
        kernel = draw(st.sampled_from([1, 3, 5]))
        dilation = draw(st.sampled_from([1, 1, 2]))
        stride = draw(st.sampled_from([1, 1, 2]))
        pad = (kernel - 1) * dilation // 2
        w = rng.standard_normal((k, c // group, *([kernel] * nd))) / np.sqrt(c // group * kernel**nd)
        if k >= 12 and draw(st.booleans()):
            w[int(rng.integers(k))] *= draw(st.floats(5.0, 50.0))  # a planted outlier channel
        name = f"conv{i}"
        inputs = [prev, tensor(f"{name}.W", w)]
        if draw(st.booleans()):
            inputs.append(tensor(f"{name}.B", rng.standard_normal(k) * 0.1))
        nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [f"{name}.out"],
                name=name,
                group=group,
                strides=[stride] * nd,
                dilations=[dilation] * nd,
                pads=[pad] * (2 * nd),
            )
        )
        out = f"{name}.out"
        if draw(st.booleans()):
            out = bn(f"bn{i}", k, out)
        pre[name] = out
        if draw(st.booleans()):
            nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
            out = f"{name}.relu"
        prev, channels = out, k
        size = (size - 1) // stride + 1  # odd kernels, padded: only the stride shrinks it
    head = draw(st.sampled_from(["none", "gemm", "gemm-gemm"]))
    if head != "none":
        nodes.append(helper.make_node("GlobalAveragePool", [prev], ["pooled"]))
        nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
        prev, width = "flat", channels
        for j in range(head.count("gemm")):
            units = draw(st.integers(2, 14))
            trans = draw(st.booleans())
            w = rng.standard_normal((units, width) if trans else (width, units)) / np.sqrt(width)
            name = f"fc{j}"
            inputs = [prev, tensor(f"{name}.W", w), tensor(f"{name}.B", rng.standard_normal(units) * 0.1)]
            nodes.append(helper.make_node("Gemm", inputs, [f"{name}.out"], name=name, transB=int(trans)))
            out = f"{name}.out"
            last = j == head.count("gemm") - 1
            if not last and draw(st.booleans()):
                out = bn(f"fcbn{j}", units, out)
            pre[name] = out
            if not last:
                nodes.append(helper.make_node("Relu", [out], [f"{name}.relu"]))
                out = f"{name}.relu"
            prev, width = out, units
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    rank = 2 if head != "none" else 2 + nd
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return Chain(model, pre, x_shape, seed)


def run(model: onnx.ModelProto, x: np.ndarray, extra: list[str] = ()) -> dict[str, np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra:
        m.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in m.graph.output]
    return dict(zip(names, sess.run(names, {"x": x}), strict=True))


def quiet(fn, *args, **kwargs):
    """Call ``fn`` with every warning an error (a warning would be printed to the user)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args, **kwargs)


def _input(chain: Chain) -> np.ndarray:
    return np.random.default_rng(chain.seed + 1).standard_normal(chain.input_shape).astype(np.float32)


options = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["clp", "lpp"]),
        "u": st.floats(-2.0, 6.0),
        "score": st.sampled_from(["spectral", "l2", "exact"]),
        "include_fc": st.booleans(),
        "fuse_bn": st.booleans(),
    }
)


@SETTINGS
@given(chain=chains(), opts=options)
def test_sanitize_raises_only_onnxclp_errors(chain: Chain, opts: dict) -> None:
    fuse = opts.pop("fuse_bn")
    try:
        quiet(scan, chain.model, **opts)
        model, report = quiet(sanitize, chain.model, fuse_bn=fuse, **opts)
    except OnnxclpError as exc:
        event(f"refused: {exc.message.split(':')[0][:40]}")
        return
    event("sanitized")
    assert report.layers
    onnx.checker.check_model(model)


@SETTINGS
@given(chain=chains(), method=st.sampled_from(["clp", "lpp"]), score=st.sampled_from(["spectral", "l2", "exact"]))
def test_huge_u_changes_nothing(chain: Chain, method: str, score: str) -> None:
    kw = {"u_low": -1e9, "bias_rate": 0.0} if method == "lpp" else {}
    try:
        model, report = quiet(sanitize, chain.model, method, 1e9, score=score, include_fc=True, **kw)
    except NothingToSanitize:  # the exact score skips layers whose input size the strides do not divide
        assert score == "exact"
        event("exact score: no layer could be scored")
        return
    assert report.pruned_channels == 0 and report.rescaled_channels == 0
    before = {t.name: t.SerializeToString() for t in chain.model.graph.initializer}
    after = {t.name: t.SerializeToString() for t in model.graph.initializer}
    assert after == before
    x = _input(chain)
    np.testing.assert_array_equal(run(model, x)["y"], run(chain.model, x)["y"])


@SETTINGS
@given(
    chain=chains(),
    method=st.sampled_from(["clp", "lpp"]),
    u=st.floats(0.3, 3.0),
    fuse=st.booleans(),
    include_fc=st.booleans(),
)
def test_pruned_channels_output_exactly_zero(chain: Chain, method: str, u: float, fuse: bool, include_fc: bool) -> None:
    model, report = quiet(sanitize, chain.model, method, u, include_fc=include_fc, fuse_bn=fuse, force=True)
    pruned = {layer.node: layer.pruned for layer in report.layers if layer.pruned}
    event(f"layers with pruned channels: {min(len(pruned), 2)}")
    if not pruned:
        return
    outs = run(model, _input(chain), [chain.pre_activation[name] for name in pruned])
    for name, channels in pruned.items():
        value = outs[chain.pre_activation[name]]
        assert np.all(value[:, channels] == 0.0), (name, channels)
        kept = [k for k in range(value.shape[1]) if k not in channels]
        assert kept, "a layer never loses all of its channels"


@SETTINGS
@given(chain=chains(), method=st.sampled_from(["clp", "lpp"]), u=st.floats(0.3, 3.0), include_fc=st.booleans())
def test_fused_and_unfused_make_the_same_decisions(chain: Chain, method: str, u: float, include_fc: bool) -> None:
    _, plain = quiet(sanitize, chain.model, method, u, include_fc=include_fc, fuse_bn=False, force=True)
    _, fused = quiet(sanitize, chain.model, method, u, include_fc=include_fc, fuse_bn=True, force=True)
    decisions = [
        {layer.node: (layer.pruned, sorted(layer.rescaled)) for layer in report.layers} for report in (plain, fused)
    ]
    event(f"channels pruned or rescaled: {min(plain.pruned_channels + plain.rescaled_channels, 1)}")
    assert decisions[0] == decisions[1]
    for a, b in zip(plain.layers, fused.layers, strict=True):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
