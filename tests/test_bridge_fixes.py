"""The bridge's fixed-batch rule, statistic buffers, exit-3 runtime errors, taps, and old-opset operators.

Old opsets: single-node models at opsets 7, 9, 11 and 13 (IR 3 with every initializer also listed as a graph
input for opsets 7 and 9, as the ONNX Model Zoo classics are) compared against onnxruntime; forms from before
opset 7, which onnxruntime does not run, against numpy.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxclp.bridge import OnnxModule, UnsupportedOp, input_spec, to_torch
from onnxclp.errors import EXIT_NOTHING, OnnxclpError
from onnxclp.io import TensorStore

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(2)

TOL = 1e-4
R = np.random.default_rng(7)
X4 = R.normal(size=(2, 6, 5, 4)).astype(np.float32)
I64 = np.int64


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _module(model: onnx.ModelProto) -> OnnxModule:
    return OnnxModule(model, TensorStore(model, Path.cwd()))


def _run(module: OnnxModule, *xs: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(np.ascontiguousarray(x)) for x in xs])
    return [t.detach().numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)), initial=0.0) <= TOL


# ------------------------------------------------------------------------------------------------------------
# 1. fixed-batch exports run at any batch size


class _ViewNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(x.view(x.size(0), -1))


def _export_fixed(batch: int, path: Path) -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    net = _ViewNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(batch, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"])  # fmt: skip
    return net, onnx.load(str(path))


def test_fixed_batch_export_runs_at_any_batch(tmp_path):
    _, model = _export_fixed(1, tmp_path / "b1.onnx")
    assert input_spec(model)[0] == (1, 3, 8, 8)
    [reshape] = [n for n in model.graph.node if n.op_type == "Reshape"]
    [shape] = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == reshape.input[1]]
    assert numpy_helper.to_array(shape.attribute[0].t)[0] == 1  # the traced x.size(0), a constant
    module = to_torch(model, base_dir=tmp_path).eval()
    assert module.fixed_batch == 1
    x = R.uniform(-2.5, 2.5, size=(7, 3, 8, 8)).astype(np.float32)
    got = _run(module, x)[0]
    ref = np.concatenate([_ort(model, {"x": x[i : i + 1]})[0] for i in range(7)])
    _close(got, ref)
    _close(_run(module, x[:1])[0], ref[:1])  # the declared batch is untouched
    # a gradient flows through the rewritten Reshape
    module(torch.from_numpy(x)).sum().backward()
    assert module.param_for("fc.weight").grad is not None
    module.fixed_batch = None  # without the rule: the classifier's Gemm fails, exit 3 naming it
    with pytest.raises(OnnxclpError, match=r"\(Gemm\): mat1 and mat2 shapes cannot be multiplied") as err:
        module(torch.from_numpy(x))
    assert err.value.exit_code == EXIT_NOTHING


def test_fixed_batch_other_than_one(tmp_path):
    net, model = _export_fixed(2, tmp_path / "b2.onnx")
    module = to_torch(model, base_dir=tmp_path).eval()
    assert module.fixed_batch == 2
    x = torch.rand(5, 3, 8, 8) * 5 - 2.5
    with torch.no_grad():
        assert torch.max(torch.abs(module(x) - net(x))) <= TOL


def _batch_graph(b0: int) -> onnx.ModelProto:
    """x (b0, 3) -> Expand(cls (1, 3), [b0, 3]) + x, Tile(cls, [b0, 1]) * x, ConstantOfShape([b0, 3]) + x."""
    nodes = [
        helper.make_node("Expand", ["cls", "shape"], ["e"]),
        helper.make_node("Tile", ["cls", "reps"], ["t"]),
        helper.make_node(
            "ConstantOfShape", ["shape"], ["c"], value=numpy_helper.from_array(np.array([2.0], np.float32))
        ),
        helper.make_node("Add", ["x", "e"], ["s1"]),
        helper.make_node("Mul", ["s1", "t"], ["s2"]),
        helper.make_node("Concat", ["s2", "c"], ["y"], axis=1),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b0, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.arange(3, dtype=np.float32).reshape(1, 3), "cls"),
         numpy_helper.from_array(np.array([b0, 3], I64), "shape"), numpy_helper.from_array(np.array([b0, 1], I64), "reps")],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("b0", [1, 2])
def test_fixed_batch_expand_tile_constant_of_shape(b0):
    model = _batch_graph(b0)
    x = R.normal(size=(5, 3)).astype(np.float32)
    got = _run(_module(model), x)[0]
    cls = np.arange(3, dtype=np.float32)
    ref = np.concatenate([(x + cls) * cls, np.full((5, 3), 2.0, np.float32)], axis=1)
    _close(got, ref)


def test_symbolic_batch_has_no_rule(tmp_path):
    model = _batch_graph(2)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    assert _module(model).fixed_batch is None


# ------------------------------------------------------------------------------------------------------------
# 2. BatchNormalization statistics are buffers


def _conv_bn_model(stat_also_added: bool = False) -> onnx.ModelProto:
    c = 4
    inits = {
        "w": R.normal(size=(c, 3, 3, 3)).astype(np.float32),
        "cb": R.normal(size=(c,)).astype(np.float32),
        "scale": (R.random(c) + 0.5).astype(np.float32),
        "bias": R.normal(size=(c,)).astype(np.float32),
        "mean": R.normal(size=(c,)).astype(np.float32),
        "var": (R.random(c) + 0.5).astype(np.float16),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["conv_out"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["var"], ["var32"], to=TensorProto.FLOAT),
        helper.make_node("BatchNormalization", ["conv_out", "scale", "bias", "mean", "var32"], ["bn_out"], name="bn0"),
        helper.make_node("Relu", ["bn_out"], ["r"], name="relu0"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    if stat_also_added:
        nodes[-1] = helper.make_node("Flatten", ["g"], ["f"])
        nodes.append(helper.make_node("Add", ["f", "mean"], ["y"]))
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def test_batchnorm_statistics_are_buffers_and_training_works():
    model = _conv_bn_model()
    module = _module(model)
    assert module.buffer_initializer_names == ["mean"]  # var feeds BN through a Cast: a parameter of the Cast
    assert "mean" not in module.float_initializer_names and "scale" in module.float_initializer_names
    assert any(b is module.buffer_for("mean") for b in module.buffers())
    assert all(p is not module.buffer_for("mean") for p in module.parameters())
    x = torch.rand(3, 3, 6, 6)
    module.train()
    module(x).pow(2).sum().backward()  # failed with "native_batch_norm is not differentiable" before
    assert module.param_for("scale").grad is not None and module.param_for("w").grad is not None
    assert module.param_for("var").grad is not None  # a statistic computed from a parameter is differentiated
    _close(_run(module.eval(), x.numpy())[0], _ort(model, {"x": x.numpy()})[0])


def test_buffer_values_in_file_dtype():
    model = _conv_bn_model()
    # var as a float16 initializer read directly by BN (the Cast removed): a float16 buffer
    model.graph.node.pop(1)
    model.graph.node[1].input[4] = "var"
    module = _module(model)
    assert set(module.buffer_initializer_names) == {"mean", "var"}
    with torch.no_grad():
        module.buffer_for("var").fill_(2.0)
    vals = module.buffer_values()
    assert vals["var"].dtype == np.float16 and np.all(vals["var"] == 2.0)
    state = module.state_to_onnx(["scale", "var"])
    assert state["var"].dtype == np.float16 and state["scale"].dtype == np.float32
    assert set(module.state_to_onnx()) == set(module.float_initializer_names)
    with pytest.raises(KeyError):
        module.param_for("mean")
    with pytest.raises(KeyError):
        module.buffer_values(["scale"])


def test_statistic_read_elsewhere_stays_a_buffer():
    module = _module(_conv_bn_model(stat_also_added=True))
    assert "mean" in module.buffer_initializer_names
    module(torch.rand(2, 3, 6, 6)).sum().backward()


# ------------------------------------------------------------------------------------------------------------
# 3. what the bridge cannot run is exit 3 naming the node


def test_runtime_failure_is_exit_3_naming_the_node():
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc_bad")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((4, 2), np.float32), "w")],
    )  # fmt: skip
    module = _module(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(OnnxclpError) as err:
        module(torch.zeros(2, 3))
    assert err.value.exit_code == EXIT_NOTHING
    msg = str(err.value)
    assert msg.startswith("the torch bridge cannot run node 'fc_bad' (MatMul): ") and "\n" not in msg
    assert isinstance(err.value.__cause__, RuntimeError)


def test_static_check_still_refuses_unsupported_forms():
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], name="rz", mode="cubic")
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "s")],
    )  # fmt: skip
    with pytest.raises(UnsupportedOp) as err:
        _module(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert "Resize (Resize mode 'cubic')" in err.value.ops and err.value.exit_code == EXIT_NOTHING


# ------------------------------------------------------------------------------------------------------------
# 4. taps, node_of_output, conv_outputs


class _Double(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.k


def test_a_half_precision_graph_is_computed_in_float32():
    """float16 initializers, a float16 input and a Cast to float16 inside: the bridge reads them as float32 (fed
    float32), gives onnxruntime's answers to float16's precision, and writes values back as float16."""
    from onnx import TensorProto

    model = _conv_bn_model()
    model.graph.node.pop(1)  # no Cast of var: every float initializer is float16
    model.graph.node[1].input[4] = "var"
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    model.graph.node.insert(0, helper.make_node("Cast", ["x16"], ["x"], to=TensorProto.FLOAT16))
    model.graph.input[0].name = "x16"
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["n", 4]))
    onnx.checker.check_model(model, full_check=True)
    module = _module(model).eval()
    assert all(p.dtype == torch.float32 for p in module.parameters())
    x = R.random((2, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    assert got.dtype == torch.float32
    ref = _ort(model, {"x16": x})[0]
    assert ref.dtype == np.float16 and np.allclose(got.numpy(), ref.astype(np.float32), rtol=1e-2, atol=1e-2)
    state = module.state_to_onnx()
    assert state and all(v.dtype == np.float16 for v in state.values())
    assert module.buffer_values()["var"].dtype == np.float16


@pytest.mark.parametrize(("fmod", "dtype"), [(0, np.int64), (1, np.int64), (1, np.float32)])
def test_mod_follows_onnxruntime(fmod, dtype):
    """Mod (nn.MultiheadAttention's export uses it): the divisor's sign with fmod=0, the dividend's with fmod=1."""
    from onnx import TensorProto

    elem = TensorProto.INT64 if dtype == np.int64 else TensorProto.FLOAT
    g = helper.make_graph(
        [helper.make_node("Mod", ["a", "b"], ["y"], fmod=fmod)], "mod",
        [helper.make_tensor_value_info("a", elem, [6]), helper.make_tensor_value_info("b", elem, [6])],
        [helper.make_tensor_value_info("y", elem, [6])],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    a = np.array([7, -7, 7, -7, 5, 0], dtype)
    b = np.array([3, 3, -3, -3, 5, 2], dtype)
    with torch.no_grad():
        got = _module(model)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.array_equal(got, _ort(model, {"a": a, "b": b})[0])


def test_taps():
    module = _module(_conv_bn_model()).eval()
    x = torch.rand(2, 3, 6, 6)
    with torch.no_grad():
        ref = module(x)
        module.set_tap("conv_out", nn.Identity())
        assert torch.equal(module(x), ref)
        module.set_tap("conv_out", _Double())  # replaces the Identity
        assert len(module.taps) == 1 and not torch.allclose(module(x), ref)
        module.remove_tap("conv_out")
        module.set_tap("r", _Double())  # an intermediate after the ReLU: the mean doubles
        assert torch.allclose(module(x), 2 * ref, atol=1e-5)
        module.set_tap("y", _Double())  # a graph output
        assert torch.allclose(module(x), 4 * ref, atol=1e-5)
    assert set(module.taps_by_name()) == {"r", "y"}
    n_params = len(list(module.parameters()))
    assert sum(p is module.taps_by_name()["r"].k for p in module.parameters()) == 1
    module.remove_tap("r")
    module.remove_tap("y")
    assert len(list(module.parameters())) == n_params - 2 and not module.taps_by_name()
    with torch.no_grad():
        assert torch.equal(module(x), ref)
    with pytest.raises(KeyError):
        module.set_tap("w", nn.Identity())  # an initializer, not a computed tensor


def test_tap_on_conv_output_reinserts_batchnorm():
    module = _module(_conv_bn_model()).eval()
    x = torch.rand(2, 3, 6, 6)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.weight.uniform_(0.5, 1.5)
        ref_conv = torch.nn.functional.conv2d(x, module.param_for("w"), module.param_for("cb"), padding=1)
        [(out, weight, bias)] = module.conv_outputs()
        assert (out, weight, bias) == ("conv_out", "w", "cb")
        module.set_tap(out, bn)
        # the BN tap sits between the conv and the graph's BatchNormalization
        op_type, ins, outs, attrs = module.node_of_output("bn_out")
        assert op_type == "BatchNormalization" and ins[0] == "conv_out" and outs == ["bn_out"] and attrs == {}
        scale, b0 = module.param_for("scale"), module.param_for("bias")
        mean, var = module.buffer_for("mean"), module.param_for("var").float()
        h = (bn(ref_conv) - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5) * scale[:, None, None]
        ref = torch.relu(h + b0[:, None, None]).mean(dim=(2, 3))
        assert torch.allclose(module(x), ref, atol=1e-5)
    assert any(p is bn.weight for p in module.parameters())
    assert module.node_of_output("y")[0] == "Flatten"
    with pytest.raises(KeyError):
        module.node_of_output("x")


# ------------------------------------------------------------------------------------------------------------
# 5. old opsets against onnxruntime


def _old_model(
    op_type: str, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray], opset: int, n_out: int, attrs: dict
) -> onnx.ModelProto:
    names = list(inputs) + list(consts)  # a const named "" is an omitted optional input
    outs = [f"y{i}" for i in range(n_out)]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items() if k]
    vi = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()
    ]
    ir = 7
    if opset < 11:  # IR 3: every initializer is also a graph input
        vi += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
        ir = 3
    g = helper.make_graph([helper.make_node(op_type, names, outs, **attrs)], "g", vi,
                          [helper.make_empty_tensor_value_info(o) for o in outs], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


C6 = 6
F32 = np.float32
BN = {
    "s": (R.random(C6) + 0.5).astype(F32),
    "b": R.normal(size=C6).astype(F32),
    "m": R.normal(size=C6).astype(F32),
    "v": (R.random(C6) + 0.5).astype(F32),
}
BN0 = {k: (R.random((C6, 5, 4)) + 0.5).astype(F32) for k in "sbmv"}  # spatial=0: per-activation statistics
X2 = R.normal(size=(3, 5)).astype(F32)

# name: (op, inputs, consts, opset, number of outputs, attributes)
OLD = {
    "squeeze7": ("Squeeze", {"x": X4[:, :1]}, {}, 7, 1, {"axes": [1]}),
    "squeeze7_all": ("Squeeze", {"x": X4[:1, :1]}, {}, 7, 1, {}),
    "unsqueeze9": ("Unsqueeze", {"x": X4}, {}, 9, 1, {"axes": [0, 3]}),
    "reducemean7": ("ReduceMean", {"x": X4}, {}, 7, 1, {"axes": [2, 3]}),
    "reducemean13": ("ReduceMean", {"x": X4}, {}, 13, 1, {"axes": [1], "keepdims": 0}),
    "reducesum11": ("ReduceSum", {"x": X4}, {}, 11, 1, {"axes": [-1], "keepdims": 0}),
    "reducesum13": ("ReduceSum", {"x": X4}, {"a": np.array([1, 2], I64)}, 13, 1, {}),
    "reducemax9_all": ("ReduceMax", {"x": X4}, {}, 9, 1, {"keepdims": 0}),
    "split7": ("Split", {"x": X4}, {}, 7, 2, {"axis": 1, "split": [2, 4]}),
    "split11_equal": ("Split", {"x": X4}, {}, 11, 3, {"axis": 1}),
    "split13": ("Split", {"x": X4}, {"s": np.array([1, 5], I64)}, 13, 2, {"axis": 1}),
    "slice7": ("Slice", {"x": X4}, {}, 7, 1, {"starts": [1, 0], "ends": [5, -1], "axes": [1, 3]}),
    "slice9_noaxes": ("Slice", {"x": X4}, {}, 9, 1, {"starts": [0, 1], "ends": [1, 1000]}),
    "slice11": ("Slice", {"x": X4}, {"s": np.array([1], I64), "e": np.array([-1], I64), "a": np.array([2], I64)}, 11,
                1, {}),
    "pad7": ("Pad", {"x": X4}, {}, 7, 1, {"pads": [0, 0, 1, 2, 0, 0, 2, 1], "value": 0.5}),
    "pad9_reflect": ("Pad", {"x": X4}, {}, 9, 1, {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "reflect"}),
    "pad11": ("Pad", {"x": X4}, {"p": np.array([0, 1, 0, 0, 0, 1, 0, 1], I64)}, 11, 1, {"mode": "edge"}),
    "clip7": ("Clip", {"x": X4}, {}, 7, 1, {"min": -0.3, "max": 0.4}),
    "clip9_max_only": ("Clip", {"x": X4}, {}, 9, 1, {"max": 0.1}),
    "clip11": ("Clip", {"x": X4}, {"lo": np.array(-0.2, F32)}, 11, 1, {}),
    "dropout7": ("Dropout", {"x": X4}, {}, 7, 1, {"ratio": 0.3}),
    "dropout9_mask": ("Dropout", {"x": X4}, {}, 9, 2, {"ratio": 0.3}),
    "dropout11_mask": ("Dropout", {"x": X4}, {}, 11, 2, {}),
    "dropout13": ("Dropout", {"x": X4}, {"r": np.array(0.5, F32)}, 13, 2, {}),
    "upsample7_nearest": ("Upsample", {"x": X4}, {}, 7, 1, {"scales": [1.0, 1.0, 2.0, 3.0]}),
    "upsample7_linear": ("Upsample", {"x": X4}, {}, 7, 1, {"scales": [1.0, 1.0, 2.0, 2.0], "mode": "linear"}),
    "upsample9_nearest_frac": ("Upsample", {"x": X4}, {"s": np.array([1, 1, 1.5, 2.5], F32)}, 9, 1, {}),
    "upsample9_linear": ("Upsample", {"x": X4}, {"s": np.array([1, 1, 2.5, 1.5], F32)}, 9, 1, {"mode": "linear"}),
    "resize10_nearest": ("Resize", {"x": X4}, {"s": np.array([1, 1, 2, 1.5], F32)}, 10, 1, {}),
    "resize11_linear": ("Resize", {"x": X4}, {"r": np.zeros(0, F32), "s": np.array([1, 1, 2, 1.5], F32)}, 11, 1,
                        {"mode": "linear"}),
    "resize11_nearest_asym": ("Resize", {"x": X4}, {"r": np.zeros(0, F32), "s": np.array([1, 1, 3, 2], F32)}, 11, 1,
                              {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    "resize11_align_sizes": ("Resize", {"x": X4}, {"r": np.zeros(0, F32), "s": np.zeros(0, F32),
                             "z": np.array([2, 6, 9, 7], I64)}, 11, 1,
                             {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    "resize13_pytorch": ("Resize", {"x": X4}, {"": np.zeros(0, F32), "s": np.array([1, 1, 1.7, 2.2], F32)}, 13, 1,
                         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    "resize13_nearest_down": ("Resize", {"x": X4}, {"": np.zeros(0, F32), "s": np.array([1, 1, 0.6, 0.5], F32)}, 13,
                              1, {"nearest_mode": "round_prefer_ceil"}),
    "resize10_linear": ("Resize", {"x": X4}, {"s": np.array([1, 1, 1.5, 0.5], F32)}, 10, 1, {"mode": "linear"}),
    "resize11_tf_nn": ("Resize", {"x": X4}, {"r": np.zeros(0, F32), "s": np.array([1, 1, 1.5, 2.5], F32)}, 11, 1,
                       {"coordinate_transformation_mode": "tf_half_pixel_for_nn"}),
    "resize13_linear_down": ("Resize", {"x": X4}, {"": np.zeros(0, F32), "s": np.array([1, 1, 0.5, 0.75], F32)}, 13, 1,
                             {"mode": "linear"}),
    "resize13_sizes_align": ("Resize", {"x": X4}, {"r": np.zeros(0, F32), "": np.zeros(0, F32),
                             "z": np.array([2, 6, 13, 9], I64)}, 13, 1,
                             {"nearest_mode": "round_prefer_ceil", "coordinate_transformation_mode": "align_corners"}),
    "resize13_sizes_one": ("Resize", {"x": X4}, {"r": np.zeros(0, F32), "": np.zeros(0, F32),
                           "z": np.array([2, 6, 1, 4], I64)}, 13, 1,
                           {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
    "resize18_axes": ("Resize", {"x": X4}, {"": np.zeros(0, F32), "s": np.array([2.2, 1.5], F32)}, 18, 1,
                      {"axes": [2, 3], "nearest_mode": "ceil"}),
    "resize19_symmetric": ("Resize", {"x": X4}, {"": np.zeros(0, F32), "s": np.array([1, 1, 1.7, 0.6], F32)}, 19, 1,
                           {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}),
    "bn7": ("BatchNormalization", {"x": X4}, BN, 7, 1, {"epsilon": 1e-3}),
    "bn7_spatial0": ("BatchNormalization", {"x": X4}, BN0, 7, 1, {"spatial": 0}),
    "bn9": ("BatchNormalization", {"x": X4}, BN, 9, 1, {}),
    "sum7": ("Sum", {"x": X4}, {"a": X4 * 2, "b": -X4}, 7, 1, {}),
    "mean7": ("Mean", {"x": X4}, {"a": X4 * 3}, 7, 1, {}),
    "max9_broadcast": ("Max", {"x": X4}, {"a": R.normal(size=(4,)).astype(F32)}, 9, 1, {}),
    "min13": ("Min", {"x": X4}, {"a": R.normal(size=(6, 1, 1)).astype(F32), "b": X4 * 0.5}, 13, 1, {}),
    "lrn7_odd": ("LRN", {"x": X4}, {}, 7, 1, {"size": 3, "alpha": 0.1, "beta": 0.6, "bias": 1.5}),
    "softmax7": ("Softmax", {"x": X4}, {}, 7, 1, {}),
    "softmax9_axis2": ("Softmax", {"x": X4}, {}, 9, 1, {"axis": 2}),
    "logsoftmax11": ("LogSoftmax", {"x": X4}, {}, 11, 1, {"axis": -1}),
    "logsoftmax13": ("LogSoftmax", {"x": X4}, {}, 13, 1, {"axis": 1}),
    "flatten7_axis0": ("Flatten", {"x": X4}, {}, 7, 1, {"axis": 0}),
    "flatten9": ("Flatten", {"x": X4}, {}, 9, 1, {"axis": 2}),
    "flatten11_neg": ("Flatten", {"x": X4}, {}, 11, 1, {"axis": -1}),
    "gemm7": ("Gemm", {"a": X2}, {"b": R.normal(size=(5, 4)).astype(F32), "c": R.normal(size=(4,)).astype(F32)}, 7, 1,
              {"alpha": 0.5}),
    "gemm9_transb": ("Gemm", {"a": X2}, {"b": R.normal(size=(4, 5)).astype(F32), "c": np.array(0.3, F32)}, 9, 1,
                     {"transB": 1, "beta": 2.0}),
    "gemm11_noc": ("Gemm", {"a": X2}, {"b": R.normal(size=(5, 2)).astype(F32)}, 11, 1, {}),
    "concat7": ("Concat", {"x": X4}, {"c": X4[:, :2]}, 7, 1, {"axis": 1}),
    "add7": ("Add", {"x": X4}, {"c": R.normal(size=(5, 1)).astype(F32)}, 7, 1, {}),
    "mul9": ("Mul", {"x": X4}, {"c": R.normal(size=(6, 1, 1)).astype(F32)}, 9, 1, {}),
    "avgpool7_include": ("AveragePool", {"x": X4}, {}, 7, 1,
                         {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "avgpool9": ("AveragePool", {"x": X4}, {}, 9, 1, {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 0, 0, 1]}),
    "avgpool11_ceil": ("AveragePool", {"x": X4}, {}, 11, 1, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "maxpool7": ("MaxPool", {"x": X4}, {}, 7, 1, {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1]}),
    "maxpool9_storage": ("MaxPool", {"x": X4}, {}, 9, 1, {"kernel_shape": [2, 2], "storage_order": 1}),
    "maxpool11_ceil": ("MaxPool", {"x": X4}, {}, 11, 1, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "gap7": ("GlobalAveragePool", {"x": X4}, {}, 7, 1, {}),
    "reshape9": ("Reshape", {"x": X4}, {"s": np.array([0, -1], I64)}, 9, 1, {}),
    "prelu7": ("PRelu", {"x": X4}, {"s": R.random((6, 1, 1)).astype(F32)}, 7, 1, {}),
    "prelu9_scalar": ("PRelu", {"x": X4}, {"s": np.array([0.2], F32)}, 9, 1, {}),
    "tile7": ("Tile", {"x": X4}, {"r": np.array([1, 2, 1, 3], I64)}, 7, 1, {}),
    "expand9": ("Expand", {"x": X4[:, :1]}, {"s": np.array([2, 6, 1, 1], I64)}, 9, 1, {}),
    "cast9": ("Cast", {"x": X4}, {}, 9, 1, {"to": TensorProto.INT32}),
    "leaky7": ("LeakyRelu", {"x": X4}, {}, 7, 1, {"alpha": 0.3}),
    "hardsigmoid7": ("HardSigmoid", {"x": X4}, {}, 7, 1, {}),
    "instnorm7": ("InstanceNormalization", {"x": X4}, {"s": BN["s"], "b": BN["b"]}, 7, 1, {"epsilon": 1e-3}),
    "argmax11": ("ArgMax", {"x": X4}, {}, 11, 1, {"axis": -1, "keepdims": 0}),
    "conv7": ("Conv", {"x": X4}, {"w": R.normal(size=(3, 6, 3, 3)).astype(F32), "b": R.normal(size=3).astype(F32)}, 7,
              1, {"pads": [1, 1, 1, 1], "strides": [2, 1]}),
    "matmul9": ("MatMul", {"x": X4}, {"w": R.normal(size=(4, 3)).astype(F32)}, 9, 1, {}),
    "transpose7": ("Transpose", {"x": X4}, {}, 7, 1, {}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OLD))
def test_old_opset_parity(case):
    op_type, inputs, consts, opset, n_out, attrs = OLD[case]
    model = _old_model(op_type, inputs, consts, opset, n_out, attrs)
    refs = _ort(model, inputs)
    module = _module(model)
    assert module.input_names == list(inputs)  # initializers that are graph inputs too are weights
    got = _run(module, *inputs.values())
    assert len(got) == len(refs)
    for g, r in zip(got, refs, strict=True):
        _close(g, r)


def test_ir3_initializers_as_inputs_are_weights():
    op_type, inputs, consts, opset, n_out, attrs = OLD["bn7"]
    model = _old_model(op_type, inputs, consts, opset, n_out, attrs)
    assert model.ir_version == 3 and len(model.graph.input) == 1 + len(consts)
    module = _module(model)
    assert module.input_names == ["x"]
    assert module.float_initializer_names == ["s", "b"] and module.buffer_initializer_names == ["m", "v"]
    assert input_spec(model) == ((2, 6, 5, 4), np.dtype(np.float32))
    # an initializer listed first among the inputs is still skipped
    model.graph.input.insert(0, model.graph.input.pop(len(model.graph.input) - 1))
    assert model.graph.input[0].name == "v" and input_spec(model)[0] == (2, 6, 5, 4)


# forms from before opset 7 (onnxruntime does not run them): against numpy


def _pre7(op_type: str, inputs: dict[str, np.ndarray], opset: int, n_out: int = 1, **attrs) -> list[np.ndarray]:
    model = _old_model(op_type, {}, inputs, opset, n_out, attrs)
    return _run(_module(model))


def test_pre7_broadcast_axis():
    a, b = X4, R.normal(size=(6, 5)).astype(F32)
    [got] = _pre7("Add", {"a": a, "b": b}, 6, broadcast=1, axis=1)
    np.testing.assert_allclose(got, a + b[None, :, :, None], rtol=1e-6)
    c = R.normal(size=(4,)).astype(F32)
    [got] = _pre7("Mul", {"a": a, "b": c}, 6, broadcast=1)  # no axis: trailing alignment
    np.testing.assert_allclose(got, a * c, rtol=1e-6)
    [got] = _pre7("Sub", {"a": a, "b": a[:1] * 0 + 1}, 1, broadcast=1, axis=0)
    np.testing.assert_allclose(got, a - 1, rtol=1e-6)


def test_pre7_attribute_forms():
    [got] = _pre7("Concat", {"a": X4, "b": X4[:, :2]}, 1)  # Concat-1: axis defaults to 1
    assert got.shape == (2, 8, 5, 4)
    got = _pre7("Split", {"x": X4, "s": np.array([4, 2], I64)}, 1, 2, axis=1)  # Split-1: sizes as an input
    assert [g.shape[1] for g in got] == [4, 2]
    [got] = _pre7("Pad", {"x": X4}, 1, paddings=[0, 0, 1, 0, 0, 0, 0, 2])  # Pad-1: ``paddings``
    assert got.shape == (2, 6, 6, 6) and got[0, 0, 0, 0] == 0
    [got] = _pre7("Cast", {"x": X4}, 1, to="INT32")  # Cast-1: the type as a string
    assert got.dtype == np.int32
    [got] = _pre7("Tile", {"x": X4, "t": np.array(3, I64), "a": np.array(2, I64)}, 1)  # Tile-1: tiles, axis
    np.testing.assert_array_equal(got, np.tile(X4, (1, 1, 3, 1)))
    [got] = _pre7("Reshape", {"x": X4}, 4, shape=[0, -1])  # Reshape-1..4: the shape attribute
    assert got.shape == (2, 120)
    slope = R.random(6).astype(F32)
    [got] = _pre7("PRelu", {"x": X4, "s": slope}, 6)  # PRelu-6: a 1-D slope is per channel
    np.testing.assert_allclose(got, np.where(X4 >= 0, X4, X4 * slope[:, None, None]), rtol=1e-6)
    [got] = _pre7("BatchNormalization", {"x": X4, **BN}, 6, is_test=1, spatial=1)
    ref = (X4 - BN["m"][:, None, None]) / np.sqrt(BN["v"][:, None, None] + 1e-5) * BN["s"][:, None, None]
    np.testing.assert_allclose(got, ref + BN["b"][:, None, None], atol=1e-5)
    [got, mask] = _pre7("Dropout", {"x": X4}, 6, 2, is_test=0, ratio=0.5)  # always inference
    np.testing.assert_array_equal(got, X4)
    assert mask.dtype == np.float32 and not mask.any()


@pytest.mark.parametrize("size", [2, 4, 5])
def test_lrn_window_against_the_spec(size):
    """onnxruntime refuses an even size; the spec's window is floor((size-1)/2) before c, ceil((size-1)/2) after."""
    model = _old_model("LRN", {"x": X4}, {}, 13, 1, {"size": size, "alpha": 0.2, "beta": 0.7, "bias": 1.2})
    [got] = _run(_module(model), X4)
    c = X4.shape[1]
    sq = np.stack([(X4[:, max(0, i - (size - 1) // 2) : min(c, i + size // 2 + 1)] ** 2).sum(1) for i in range(c)], 1)
    np.testing.assert_allclose(got, X4 / (1.2 + 0.2 / size * sq) ** 0.7, rtol=1e-5)


def test_upsample_1_refused():
    g = helper.make_graph(
        [helper.make_node("Upsample", ["x"], ["y"], name="up", height_scale=2.0, width_scale=2.0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    with pytest.raises(UnsupportedOp) as err:
        _module(helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)]))
    assert err.value.ops == {"Upsample (experimental Upsample-1)": ["up"]}


def test_dynamic_view_flatten_export_runs(tmp_path):
    """``x.view(x.size(0), -1)`` exported with dynamic axes reads the batch through Shape -> Gather with a scalar
    index into a 1-D shape: the Gather's output is 0-d."""
    import onnxruntime as ort
    import torch

    from onnxclp.bridge import load

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 6 * 6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc(h.view(h.size(0), -1))

    path = tmp_path / "view.onnx"
    torch.onnx.export(Net().eval(), torch.rand(2, 3, 8, 8), path, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = load(path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
