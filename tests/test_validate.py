"""onnxclp.validate: what the loader's model checks accept (issue 15, point 6).

The refusals are in the hostile corpus (tests/test_hostile.py). Here: valid models that must still load
(grouped, depthwise and transposed convolutions, quantized weights, old BatchNormalization, a graph output of
unknown rank, external data read from another working directory), and the skeleton handed to onnx's checker
(no weight bytes, no external entry, the model itself untouched).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxclp.errors import OnnxclpError
from onnxclp.io import iter_tensors, load_model
from onnxclp.validate import STUB_BYTES, check_channels, check_model, skeleton


def _model(nodes, inits, x_shape, y_shape, opset: int = 17, y_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", y_type, y_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal(shape).astype(np.float32), name)


@pytest.mark.parametrize(("group", "cin", "cout"), [(1, 8, 4), (2, 8, 6), (8, 8, 8), (8, 8, 16)])
def test_grouped_and_depthwise_convs_pass(group: int, cin: int, cout: int) -> None:
    m = _model(
        [
            helper.make_node("Conv", ["x", "W0"], ["a"], group=1, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2]),
            helper.make_node("Conv", ["p", "W"], ["y"], group=group),
        ],
        [_w("W0", cin, 3, 3, 3), _w("W", cout, cin // group, 1, 1)],
        [1, 3, 8, 8],
        [1, cout, 4, 4],
    )
    check_model(m)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_passes(group: int) -> None:
    m = _model(
        [
            helper.make_node("Conv", ["x", "W0"], ["a"]),
            helper.make_node("ConvTranspose", ["a", "W"], ["b"], group=group),
            helper.make_node("BatchNormalization", ["b", "s", "s", "z", "s"], ["y"]),
        ],
        [
            _w("W0", 4, 3, 1, 1),
            _w("W", 4, 3, 2, 2),
            _w("s", 3 * group),
            numpy_helper.from_array(np.zeros(3 * group, np.float32), "z"),
        ],
        [1, 3, 8, 8],
        [1, 3 * group, 9, 9],
    )
    check_model(m)


def test_conv_transpose_group_must_divide_its_input_channels() -> None:
    m = _model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=2)], [_w("W", 3, 2, 2, 2)], [1, 3, 8, 8], None
    )
    with pytest.raises(OnnxclpError, match="group 2 does not divide the weight's 3 input channels"):
        check_channels(m.graph)


def test_quantized_weight_is_followed_through_dequantize() -> None:
    """QDQ: the weight is DequantizeLinear(int8 initializer); its dims are those of the int8 tensor."""
    q = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.int8), "Wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "ws")
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "ws"], ["W"]),
        helper.make_node("Conv", ["x", "W"], ["y"]),
    ]
    check_model(_model(nodes, [q, scale], [1, 2, 5, 5], [1, 4, 3, 3]))
    bad = _model(nodes, [q, scale], [1, 3, 5, 5], [1, 4, 3, 3])
    with pytest.raises(OnnxclpError, match="its input has 3 channels"):
        check_model(bad)


def test_batchnorm_spatial_0_is_not_per_channel() -> None:
    """BatchNormalization before opset 9 with spatial=0 has one value per activation (C x H x W)."""
    m = _model(
        [
            helper.make_node("Conv", ["x", "W"], ["a"]),
            helper.make_node("BatchNormalization", ["a", "s", "s", "s", "s"], ["y"], spatial=0),
        ],
        [_w("W", 2, 3, 1, 1), _w("s", 2, 4, 4)],
        [1, 3, 4, 4],
        [1, 2, 4, 4],
        opset=7,
    )
    m.ir_version = 3  # initializers must be graph inputs too before IR 4
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in m.graph.initializer)
    check_model(m)


def test_batchnorm_after_gemm_counts_its_output_columns() -> None:
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["a"], transB=1),
        helper.make_node("BatchNormalization", ["a", "s", "s", "s", "s"], ["y"]),
    ]
    check_model(_model(nodes, [_w("W", 5, 3), _w("s", 5)], [2, 3], [2, 5]))
    with pytest.raises(OnnxclpError, match="scale has 3 values but its input has 5 channels"):
        check_model(_model(nodes, [_w("W", 5, 3), _w("s", 3)], [2, 3], [2, 5]))


def test_graph_output_of_unknown_rank_is_accepted() -> None:
    """The IR allows a graph output without a shape; only that checker rule is relaxed (onnx/onnx#2932)."""
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [], [1, 3], None)
    assert not m.graph.output[0].type.tensor_type.HasField("shape")
    check_model(m)


def test_skeleton_holds_no_weights_and_leaves_the_model_alone(tmp_path: Path) -> None:
    big = _w("W", 64, 3, 3, 3)
    small = _w("b", 8)
    ext = _w("E", 16, 64, 1, 1)
    (tmp_path / "e.bin").write_bytes(numpy_helper.to_array(ext).tobytes())
    ext.ClearField("raw_data")
    for key, value in (("location", "e.bin"), ("offset", "0"), ("length", str(16 * 64 * 4))):
        entry = ext.external_data.add()
        entry.key, entry.value = key, value
    ext.data_location = TensorProto.EXTERNAL
    const = helper.make_node("Constant", [], ["c"], value=_w("cv", 32, 32))
    m = _model(
        [const, helper.make_node("Conv", ["x", "W"], ["a"]), helper.make_node("Conv", ["a", "E"], ["y"])],
        [big, small, ext],
        [1, 3, 8, 8],
        [1, 16, 6, 6],
    )
    before = m.SerializeToString()
    skel = skeleton(m)
    assert m.SerializeToString() == before
    for t in iter_tensors(skel):
        assert t.data_location != TensorProto.EXTERNAL and t.ByteSize() <= STUB_BYTES, t.name
    assert {t.name for t in skel.graph.initializer} == {"W", "b", "E"}
    assert next(t for t in skel.graph.initializer if t.name == "b") == small  # small tensors are kept whole
    onnx.checker.check_model(skel)
    # The model loads from its own folder whatever the working directory (the checker resolves nothing).
    path = tmp_path / "m.onnx"
    path.write_bytes(before)
    load_model(path)


def test_value_info_is_not_taken_for_a_channel_count() -> None:
    """value_info is a hint runtimes override: a wrong one is not a reason to refuse a model."""
    m = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Conv", ["r", "W"], ["y"])],
        [_w("W", 4, 3, 1, 1)],
        [1, 3, 8, 8],
        [1, 4, 8, 8],
    )
    m.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 5, 8, 8]))
    check_model(m)


def _conv(opset: int = 17, group: int = 1) -> onnx.ModelProto:
    return _model(
        [helper.make_node("Conv", ["x", "W"], ["y"], group=group)],
        [_w("W", 4, 3, 3, 3)],
        [1, 3, 8, 8],
        [1, 4, 6, 6],
        opset,
    )


def _refusals(m: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """The error of :func:`onnxclp.api.scan` on the model in memory and on the same model saved as a file."""
    from onnxclp.api import scan

    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    out = []
    for src in (m, path):
        with pytest.raises(OnnxclpError) as exc:
            scan(src)
        out.append(exc.value.message.removeprefix(f"{path}: ").removeprefix("model: "))
    return out


def test_an_opset_newer_than_onnx_knows_is_refused_in_memory_and_from_a_file(tmp_path: Path) -> None:
    newest = onnx.defs.onnx_opset_version()
    check_model(_conv(newest))  # the newest known is fine
    in_memory, from_file = _refusals(_conv(newest + 1), tmp_path)
    assert in_memory == from_file
    assert f"opset ai.onnx {newest + 1} is newer than the installed onnx {onnx.__version__} knows" in in_memory


def test_an_invalid_model_in_memory_is_refused_as_from_a_file(tmp_path: Path) -> None:
    in_memory, from_file = _refusals(_conv(group=2), tmp_path)  # 3 input channels, weight takes 3 x 2
    assert in_memory == from_file
    assert "with group 2 takes 6" in in_memory
