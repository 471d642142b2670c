"""The ONNX -> torch bridge (onnxclp.bridge): logits equal onnxruntime's, gradients reach the weights.

Parity: within 1e-4 (absolute) on inputs drawn uniformly from [-2.5, 2.5] (the range of CIFAR images after
per-channel normalisation), for the golden models (both torch exporters, BatchNorm kept, tf2onnx NHWC, QDQ),
the test architectures exported by both exporters, the zoo's MobileNetV2-style network, and single-node
models for every attribute form the executor interprets itself (auto_pad, asymmetric pads, ceil_mode,
opset-dependent inputs).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch_models import VGGBN, PreActResNet, SmallResNet, randomize_bn

from onnxclp.bridge import OnnxModule, UnsupportedOp, input_spec, load, to_torch
from onnxclp.errors import EXIT_NOTHING
from onnxclp.io import load_model

ort = pytest.importorskip("onnxruntime")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
TOL = 1e-4


def _ort(path_or_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    src = str(path_or_model) if isinstance(path_or_model, Path) else path_or_model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _random_input(model: onnx.ModelProto, batch: int = 3, seed: int = 0) -> np.ndarray:
    shape, dtype = input_spec(model)
    shape = tuple(batch if d is None else d for d in shape)
    return np.random.default_rng(seed).uniform(-2.5, 2.5, size=shape).astype(dtype)


def _check_file(path: Path) -> float:
    model, store = load_model(path)
    module = to_torch(model, store=store).eval()
    x = _random_input(model)
    ref = _ort(path, {module.input_names[0]: x})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape
    diff = float(np.max(np.abs(got - ref)))
    assert diff <= TOL, f"{path.name}: max |torch - onnxruntime| = {diff}"
    return diff


@pytest.mark.parametrize("name", sorted(p.name for p in GOLDEN.glob("*.onnx")))
def test_golden_parity(name):
    _check_file(GOLDEN / name)


def _export(m: torch.nn.Module, path: Path, dynamo: bool, size: int = 16) -> None:
    x = torch.randn(2, 3, size, size)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(m, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
        else:
            torch.onnx.export(m, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n"}})  # fmt: skip


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def dynamo(request):
    return request.param


@pytest.mark.parametrize("arch", ["resnet", "vgg_bn", "preact_resnet"])
def test_torch_export_parity(arch, dynamo, tmp_path):
    torch.manual_seed(0)
    model = {"resnet": SmallResNet, "vgg_bn": VGGBN, "preact_resnet": PreActResNet}[arch](width=8).eval()
    randomize_bn(model, seed=1)
    path = tmp_path / "m.onnx"
    _export(model, path, dynamo)
    _check_file(path)
    # and the bridge reproduces the torch model itself
    module = load(path).eval()
    x = torch.rand(2, 3, 16, 16) * 5 - 2.5
    with torch.no_grad():
        assert torch.max(torch.abs(module(x) - model(x))) <= TOL


@pytest.mark.parametrize("variant", ["initializers_as_inputs", "model_local_functions"])
def test_torchscript_export_variants(variant, tmp_path):
    """Old-style graphs that list every initializer as an input, and model-local functions (inlined first)."""
    from torch_models import BasicBlock

    torch.manual_seed(0)
    model = SmallResNet(width=8).eval()
    randomize_bn(model, seed=4)
    path = tmp_path / "m.onnx"
    kwargs = (
        {"keep_initializers_as_inputs": True}
        if variant == "initializers_as_inputs"
        else {"export_modules_as_functions": {BasicBlock}, "opset_version": 15}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}}, **kwargs)  # fmt: skip
    model_proto, _ = load_model(path)
    if variant == "initializers_as_inputs":
        assert len(model_proto.graph.input) > 1
    else:
        assert len(model_proto.functions) > 0
    _check_file(path)


def _train_backdoored():
    spec = importlib.util.spec_from_file_location("train_backdoored", ROOT / "examples" / "train_backdoored.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_backdoored", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("arch", ["mobilenet", "resnet-nobn"])
def test_zoo_architectures_parity(arch, dynamo, tmp_path):
    tb = _train_backdoored()
    torch.manual_seed(0)
    model = tb.make_model(arch).eval()
    randomize_bn(model, seed=3, outliers=0)
    path = tmp_path / "m.onnx"
    _export(model, path, dynamo, size=32)
    _check_file(path)


def test_gradient_reaches_parameters():
    module = load(GOLDEN / "resnet.dynamo.onnx")
    # the Reshape target (int64) is a buffer, every float weight a parameter
    assert 0 < len(module.float_initializer_names) < len(module.initializer_names)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    module(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    grads = [module.param_for(n).grad for n in module.float_initializer_names]
    assert all(g is not None for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads if g is not None) >= len(grads) - 1


def test_state_to_onnx_round_trip(tmp_path):
    model, store = load_model(GOLDEN / "vgg.torchscript.onnx")
    module = to_torch(model, store=store)
    name = module.float_initializer_names[0]
    with torch.no_grad():
        module.param_for(name).mul_(0.0)
    state = module.state_to_onnx()
    assert set(state) == set(module.float_initializer_names)
    assert not state[name].any()
    for t in model.graph.initializer:
        if t.name in state:
            assert state[t.name].dtype == store.read(t).dtype
            assert state[t.name].shape == tuple(t.dims)
    # written back, onnxruntime sees the edit the torch module computes with
    for t in model.graph.initializer:
        if t.name in state:
            store.write(t, state[t.name])
    out = tmp_path / "edited.onnx"
    onnx.save(model, out)
    x = _random_input(model)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - _ort(out, {"x": x})[0])) <= TOL


def test_external_data_goes_through_the_store():
    """The dynamo golden model keeps its weights in resnet.dynamo.onnx.data; they are read via TensorStore."""
    model = onnx.load(str(GOLDEN / "resnet.dynamo.onnx"), load_external_data=False)
    module = to_torch(model, base_dir=GOLDEN)
    assert len(module.float_initializer_names) > 0


def _lstm_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu0"),
        helper.make_node("LSTM", ["r", "W", "R"], ["y"], name="lstm0", hidden_size=2),
        helper.make_node("Foo", ["y"], ["z"], name="foo0", domain="custom"),
    ]
    g = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((1, 8, 3), np.float32), "W"),
         numpy_helper.from_array(np.zeros((1, 8, 2), np.float32), "R")],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])


def test_unsupported_op_named_before_running():
    with pytest.raises(UnsupportedOp) as err:
        to_torch(_lstm_model())
    assert set(err.value.ops) == {"LSTM", "custom.Foo"}
    assert err.value.ops["LSTM"] == ["lstm0"]
    assert "LSTM" in str(err.value) and "lstm0" in str(err.value) and "custom.Foo" in str(err.value)
    assert err.value.exit_code == EXIT_NOTHING


def test_input_spec():
    model, _ = load_model(GOLDEN / "keras_cnn.onnx")
    shape, dtype = input_spec(model)
    assert shape[1:] == (12, 12, 3) and dtype == np.float32
    model, _ = load_model(GOLDEN / "resnet.torchscript.onnx")
    assert input_spec(model) == ((None, 3, 16, 16), np.dtype(np.float32))


# ------------------------------------------------------------------------------------------------------------
# single-node models: each attribute form the executor interprets, against onnxruntime


def _node_model(op_type: str, inputs: dict[str, np.ndarray], consts: dict[str, np.ndarray], opset: int, **attrs):
    names = list(inputs) + list(consts)  # a const named "" is an omitted optional input
    node = helper.make_node(op_type, names, ["y"], **attrs)
    g = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()],
        [helper.make_empty_tensor_value_info("y")],
        [numpy_helper.from_array(v, k) for k, v in consts.items() if k],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


R = np.random.default_rng(1)
X4 = R.normal(size=(2, 4, 9, 7)).astype(np.float32)
W = R.normal(size=(6, 2, 3, 3)).astype(np.float32)
WT = R.normal(size=(4, 3, 3, 2)).astype(np.float32)
B6 = R.normal(size=(6,)).astype(np.float32)
I64 = np.int64

CASES = {
    "conv_same_upper": ("Conv", {"x": X4}, {"w": W, "b": B6}, 17, {"group": 2, "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "conv_same_lower": ("Conv", {"x": X4}, {"w": W}, 17, {"group": 2, "strides": [2, 1], "auto_pad": "SAME_LOWER"}),
    "conv_asym_dil": ("Conv", {"x": X4}, {"w": W}, 17, {"group": 2, "pads": [0, 1, 2, 0], "dilations": [2, 1]}),
    "conv_valid": ("Conv", {"x": X4}, {"w": W[:, :, :, :2]}, 11, {"group": 2, "auto_pad": "VALID"}),
    "convT": ("ConvTranspose", {"x": X4}, {"w": WT}, 17, {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]}),
    "convT_group_dil": ("ConvTranspose", {"x": X4}, {"w": WT[:, :1]}, 17, {"group": 2, "dilations": [2, 1]}),
    "convT_same": ("ConvTranspose", {"x": X4}, {"w": WT}, 17, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "convT_output_shape": ("ConvTranspose", {"x": X4}, {"w": WT}, 17, {"strides": [2, 2], "output_shape": [18, 15]}),
    "maxpool_ceil": ("MaxPool", {"x": X4}, {}, 12, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    "maxpool_asym": ("MaxPool", {"x": X4}, {}, 12, {"kernel_shape": [2, 3], "pads": [1, 0, 0, 2]}),
    "maxpool_same": ("MaxPool", {"x": X4}, {}, 12, {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "avgpool_include": ("AveragePool", {"x": X4}, {}, 19, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    "avgpool_exclude": ("AveragePool", {"x": X4}, {}, 19, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "avgpool_asym": ("AveragePool", {"x": X4}, {}, 19, {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0], "count_include_pad": 1}),
    "avgpool_ceil": ("AveragePool", {"x": X4}, {}, 19, {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}),
    "gap": ("GlobalAveragePool", {"x": X4}, {}, 17, {}),
    "bn": ("BatchNormalization", {"x": X4}, {"s": R.random(4).astype(np.float32), "b": R.random(4).astype(np.float32),
           "m": R.random(4).astype(np.float32), "v": R.random(4).astype(np.float32) + 0.5}, 15, {"epsilon": 1e-3}),
    "clip6": ("Clip", {"x": X4}, {}, 6, {"min": -0.5, "max": 0.7}),
    "clip13": ("Clip", {"x": X4}, {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}, 13, {}),
    "clip13_max_only": ("Clip", {"x": X4}, {"": np.zeros(0, np.float32), "hi": np.array(0.2, np.float32)}, 13, {}),
    "leaky": ("LeakyRelu", {"x": X4}, {}, 16, {"alpha": 0.2}),
    "hsig": ("HardSigmoid", {"x": X4}, {}, 6, {"alpha": 0.3, "beta": 0.4}),
    "hswish": ("HardSwish", {"x": X4}, {}, 14, {}),
    "sigmoid": ("Sigmoid", {"x": X4}, {}, 13, {}),
    "tanh": ("Tanh", {"x": X4}, {}, 13, {}),
    "gemm": ("Gemm", {"a": R.normal(size=(5, 3)).astype(np.float32)},
             {"b": R.normal(size=(4, 5)).astype(np.float32), "c": R.normal(size=(4,)).astype(np.float32)}, 13,
             {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    "matmul": ("MatMul", {"a": X4}, {"b": R.normal(size=(7, 3)).astype(np.float32)}, 13, {}),
    "div_int": ("Div", {"a": np.array([7, -7, 9], I64)}, {"b": np.array([2, 2, -4], I64)}, 13, {}),
    "flatten2": ("Flatten", {"x": X4}, {}, 13, {"axis": 2}),
    "reshape": ("Reshape", {"x": X4}, {"s": np.array([0, -1, 7], I64)}, 14, {}),
    "transpose": ("Transpose", {"x": X4}, {}, 13, {"perm": [0, 2, 3, 1]}),
    "squeeze11": ("Squeeze", {"x": X4[:, :1]}, {}, 11, {"axes": [1]}),
    "squeeze13": ("Squeeze", {"x": X4[:, :1]}, {"a": np.array([-3], I64)}, 13, {}),
    "unsqueeze11": ("Unsqueeze", {"x": X4}, {}, 11, {"axes": [0, -1]}),
    "unsqueeze13": ("Unsqueeze", {"x": X4}, {"a": np.array([4, 1], I64)}, 13, {}),
    "concat": ("Concat", {"x": X4}, {"c": X4[:, :2] * 2}, 13, {"axis": -3}),
    "gather_scalar": ("Gather", {"x": X4}, {"i": np.array(-1, I64)}, 13, {"axis": 1}),
    "gather_2d": ("Gather", {"x": X4}, {"i": np.array([[0, 2], [1, -1]], I64)}, 13, {"axis": 2}),
    "slice9": ("Slice", {"x": X4}, {}, 9, {"starts": [1, -3], "ends": [100, -1], "axes": [1, 3]}),
    "slice13_neg_step": ("Slice", {"x": X4}, {"s": np.array([-1, 7], I64), "e": np.array([-100, 1], I64),
                         "a": np.array([2, 3], I64), "t": np.array([-2, -3], I64)}, 13, {}),
    "cast": ("Cast", {"x": X4}, {}, 13, {"to": TensorProto.INT64}),
    "softmax11": ("Softmax", {"x": X4}, {}, 11, {"axis": 1}),
    "softmax13": ("Softmax", {"x": X4}, {}, 13, {"axis": 1}),
    "pad_const": ("Pad", {"x": X4}, {"p": np.array([0, 0, 1, 2, 0, 0, 3, -1], I64), "v": np.array(0.5, np.float32)}, 13,
                  {}),
    "pad_reflect": ("Pad", {"x": X4}, {"p": np.array([0, 0, 2, 1, 0, 0, 1, 2], I64)}, 13, {"mode": "reflect"}),
    "pad_edge2": ("Pad", {"x": X4}, {}, 2, {"pads": [0, 0, 1, 1, 0, 0, 1, 1], "mode": "edge"}),
    "pad_axes18": ("Pad", {"x": X4}, {"p": np.array([1, 2, 3, 0], I64), "": np.zeros(0, np.float32),
                   "ax": np.array([-1, 2], I64)}, 18, {}),
    "reducemean13": ("ReduceMean", {"x": X4}, {}, 13, {"axes": [2, 3], "keepdims": 0}),
    "reducemean18": ("ReduceMean", {"x": X4}, {"a": np.array([-1], I64)}, 18, {}),
    "reducesum13": ("ReduceSum", {"x": X4}, {"a": np.array([1], I64)}, 13, {"keepdims": 0}),
    "dequant": ("DequantizeLinear", {"q": R.integers(-128, 127, size=(6, 2, 3, 3)).astype(np.int8)},
                {"s": R.random(6).astype(np.float32), "z": R.integers(-3, 3, size=6).astype(np.int8)}, 13, {"axis": 0}),
    "quant": ("QuantizeLinear", {"x": X4}, {"s": np.array(0.02, np.float32), "z": np.array(3, np.uint8)}, 13, {}),
    "dropout": ("Dropout", {"x": X4}, {}, 13, {}),
    "expand": ("Expand", {"x": X4[:, :1]}, {"s": np.array([4, 1, 1], I64)}, 13, {}),
    "where": ("Where", {"c": X4 > 0}, {"a": X4 * 2, "b": -X4}, 16, {}),
    "split18": ("Split", {"x": X4}, {}, 18, {"axis": 1, "num_outputs": 1}),
    "prelu": ("PRelu", {"x": X4}, {"s": R.random((4, 1, 1)).astype(np.float32)}, 16, {}),
    "gelu": ("Gelu", {"x": X4}, {}, 20, {"approximate": "tanh"}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_single_node_parity(case):
    op_type, inputs, consts, opset, attrs = CASES[case]
    model = _node_model(op_type, inputs, consts, opset, **attrs)
    module = OnnxModule(model, _store(model))
    ref = _ort(model, inputs)[0]
    with torch.no_grad():
        got = module(*[torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()])
    got = got.numpy()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert got.dtype == ref.dtype
    assert np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)), initial=0.0) <= TOL


def _store(model):
    from onnxclp.io import TensorStore

    return TensorStore(model, Path.cwd())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_parity():
    for name in ("resnet.dynamo.onnx", "resnet.torchscript.onnx", "keras_cnn.onnx", "qdq.onnx"):
        model, store = load_model(GOLDEN / name)
        module = to_torch(model, store=store).eval()
        x = _random_input(model)
        with torch.no_grad():
            cpu = module(torch.from_numpy(x)).numpy()
            gpu = module.to("cuda")(torch.from_numpy(x).to("cuda")).cpu().numpy()
        assert np.max(np.abs(cpu - gpu)) <= 1e-3, name
