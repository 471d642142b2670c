"""Malformed and hostile inputs (issue #7, part 1).

Every input of the corpus is generated here, in ``tmp_path``, with ``onnx.helper``. For each one, both
``onnxclp sanitize`` and ``onnxclp scan`` must exit with code 2 and print exactly one line, ``error: ...``, on
stderr (no traceback), must leave no output file behind (no OUT, no OUT.data, no temporary file) and must leave
every file they could see byte-identical (hashed before and after), including the files that hostile
external-data entries point to outside the model's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxclp.cli import app
from onnxclp.errors import OnnxclpError
from onnxclp.io import load_model

RUNNER = CliRunner()


# ---------------------------------------------------------------------------------------------------------------
# A small valid model, and ways to break it
# ---------------------------------------------------------------------------------------------------------------


def small_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> conv1 (bias) -> bn1 -> Relu -> conv2 -> y: one hidden scored layer, one output layer.

    conv1 has 16 channels: with K channels no z-score exceeds (K - 1) / sqrt(K), so u = 3 needs K >= 11.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "B1"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((4, 16, 3, 3)).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def externalize(tensor: TensorProto, location: str, offset: int | None = 0, length: int | None = None) -> None:
    """Turn an in-memory tensor into an external-data reference (the bytes are written by the caller)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        e = tensor.external_data.add()
        e.key, e.value = key, value
    tensor.data_location = TensorProto.EXTERNAL


def raw_of(model: onnx.ModelProto, name: str) -> bytes:
    return numpy_helper.to_array(init(model, name)).astype("<f4").tobytes()


def write(path: Path, model: onnx.ModelProto) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


# Each builder gets (folder of the model, folder outside it) and returns the model's path.
Builder = Callable[[Path, Path], Path]


def _external_w1(location_for: Callable[[Path, Path, bytes], str]) -> Builder:
    """A model whose W1 is external; ``location_for(inside, outside, data)`` places the bytes, returns location."""

    def build(inside: Path, outside: Path) -> Path:
        m = small_model()
        data = raw_of(m, "W1")
        location = location_for(inside, outside, data)
        externalize(init(m, "W1"), location, 0, len(data))
        return write(inside / "model.onnx", m)

    return build


def _loc_parent(inside: Path, outside: Path, data: bytes) -> str:
    (inside.parent / "x").write_bytes(data)
    return "../x"


def _loc_parent_nested(inside: Path, outside: Path, data: bytes) -> str:
    (inside / "sub").mkdir()
    (inside.parent / "x").write_bytes(data)
    return "sub/../../x"


def _loc_absolute(inside: Path, outside: Path, data: bytes) -> str:
    (outside / "w.bin").write_bytes(data)
    return str(outside / "w.bin")


def _loc_symlink(inside: Path, outside: Path, data: bytes) -> str:
    (outside / "w.bin").write_bytes(data)
    os.symlink(outside / "w.bin", inside / "w.bin")
    return "w.bin"


def _loc_symlink_inside(inside: Path, outside: Path, data: bytes) -> str:
    (inside / "real.bin").write_bytes(data)
    os.symlink("real.bin", inside / "w.bin")
    return "w.bin"


def _loc_symlink_dir(inside: Path, outside: Path, data: bytes) -> str:
    (outside / "w.bin").write_bytes(data)
    os.symlink(outside, inside / "sub")
    return "sub/w.bin"


def _loc_hardlink(inside: Path, outside: Path, data: bytes) -> str:
    (outside / "w.bin").write_bytes(data)
    os.link(outside / "w.bin", inside / "w.bin")
    return "w.bin"


def _loc_fifo(inside: Path, outside: Path, data: bytes) -> str:
    os.mkfifo(inside / "w.bin")  # reading it would block forever
    return "w.bin"


def _loc_directory(inside: Path, outside: Path, data: bytes) -> str:
    (inside / "w.bin").mkdir()
    return "w.bin"


def _loc_missing(inside: Path, outside: Path, data: bytes) -> str:
    return "w.bin"


def _loc_nul(inside: Path, outside: Path, data: bytes) -> str:
    (inside / "w.bin").write_bytes(data)
    return "w.bin\x00.txt"


def _loc_backslash_parent(inside: Path, outside: Path, data: bytes) -> str:
    (inside.parent / "x").write_bytes(data)
    return "..\\x"


def _ext_entry(**changes: str | None) -> Builder:
    """W1 external in ``w.bin`` (holding its bytes), with the entry's fields replaced by ``changes``."""

    def build(inside: Path, outside: Path) -> Path:
        m = small_model()
        data = raw_of(m, "W1")
        (inside / "w.bin").write_bytes(data)
        fields = {"location": "w.bin", "offset": "0", "length": str(len(data))}
        fields.update(changes)
        t = init(m, "W1")
        externalize(t, "w.bin")
        del t.external_data[:]
        for key, value in fields.items():
            if value is not None:
                e = t.external_data.add()
                e.key, e.value = key, value
        return write(inside / "model.onnx", m)

    return build


def _ext_dims_mismatch(inside: Path, outside: Path) -> Path:
    # The file holds enough bytes, the entry is inside it, but its length is not dims x 4.
    m = small_model()
    data = raw_of(m, "W1")
    (inside / "w.bin").write_bytes(data + bytes(64))
    externalize(init(m, "W1"), "w.bin", 0, len(data) + 16)
    return write(inside / "model.onnx", m)


def _ext_no_length_mismatch(inside: Path, outside: Path) -> Path:
    # No length field: the rest of the file is taken, and it is not dims x 4.
    m = small_model()
    data = raw_of(m, "W1")
    (inside / "w.bin").write_bytes(data + bytes(8))
    externalize(init(m, "W1"), "w.bin", 0, None)
    return write(inside / "model.onnx", m)


def _ext_in_subgraph(inside: Path, outside: Path) -> Path:
    # The hostile entry hides in an If branch's initializer: every tensor of the model is checked at load.
    m = small_model()
    (inside.parent / "x").write_bytes(bytes(16))
    t = numpy_helper.from_array(np.zeros(4, np.float32), "hidden")
    externalize(t, "../x", 0, 16)
    branch = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["o"])],
        "branch",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [4])],
        [t],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    m.graph.initializer.append(cond)
    m.graph.node.append(helper.make_node("If", ["cond"], ["z"], name="if", then_branch=branch, else_branch=branch))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [4]))
    return write(inside / "model.onnx", m)


def _ext_in_constant(inside: Path, outside: Path) -> Path:
    # A Constant node's value attribute pointing outside the folder.
    m = small_model()
    (outside / "w.bin").write_bytes(bytes(16))
    t = numpy_helper.from_array(np.zeros(4, np.float32), "")
    externalize(t, str(outside / "w.bin"), 0, 16)
    m.graph.node.append(helper.make_node("Constant", [], ["k"], name="const", value=t))
    m.graph.output.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [4]))
    return write(inside / "model.onnx", m)


def _raw_file(data: bytes) -> Builder:
    def build(inside: Path, outside: Path) -> Path:
        p = inside / "model.onnx"
        p.write_bytes(data)
        return p

    return build


def _random_bytes(inside: Path, outside: Path) -> Path:
    return _raw_file(np.random.default_rng(7).bytes(4096))(inside, outside)


def _truncated(inside: Path, outside: Path) -> Path:
    data = small_model().SerializeToString()
    return _raw_file(data[: len(data) // 2])(inside, outside)


def _truncated_one_byte(inside: Path, outside: Path) -> Path:
    data = small_model().SerializeToString()
    return _raw_file(data[:-1])(inside, outside)


def _tensor_proto(inside: Path, outside: Path) -> Path:
    # A valid protobuf message, but a TensorProto: it parses as a ModelProto with no graph.
    t = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "t")
    return _raw_file(t.SerializeToString())(inside, outside)


def _graph_proto(inside: Path, outside: Path) -> Path:
    return _raw_file(small_model().graph.SerializeToString())(inside, outside)


def _text_file(inside: Path, outside: Path) -> Path:
    return _raw_file(b'{"this": "is json, not onnx"}\n')(inside, outside)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2)."""

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _nested_ifs(inside: Path, outside: Path) -> Path:
    # If nodes nested 150 deep, deeper than protobuf's parser accepts. Written on the wire directly: the
    # Python protobuf runtime refuses to build such a message.
    graph = helper.make_graph([], "leaf", [], []).SerializeToString()
    for _ in range(150):
        attribute = helper.make_attribute("then_branch", helper.make_graph([], "x", [], []))
        attribute.ClearField("g")
        attribute_bytes = attribute.SerializeToString() + _field(6, graph)  # AttributeProto.g = 6
        node_bytes = helper.make_node("If", ["c"], ["o"]).SerializeToString() + _field(5, attribute_bytes)
        graph = _field(1, node_bytes)  # GraphProto.node = 1
    m = small_model()
    m.ClearField("graph")
    return _raw_file(m.SerializeToString() + _field(7, graph))(inside, outside)  # ModelProto.graph = 7


def _edit(fn: Callable[[onnx.ModelProto], None]) -> Builder:
    def build(inside: Path, outside: Path) -> Path:
        m = small_model()
        fn(m)
        return write(inside / "model.onnx", m)

    return build


def _set_array(name: str, value: np.ndarray) -> Callable[[onnx.ModelProto], None]:
    def fn(m: onnx.ModelProto) -> None:
        init(m, name).CopyFrom(numpy_helper.from_array(value, name))

    return fn


def _with_nan(m: onnx.ModelProto) -> None:
    w = numpy_helper.to_array(init(m, "W1")).copy()
    w[3, 1, 1, 1] = np.nan
    _set_array("W1", w)(m)


def _with_inf(m: onnx.ModelProto) -> None:
    w = numpy_helper.to_array(init(m, "W2")).copy()
    w[0, 0, 0, 0] = np.inf
    _set_array("W2", w)(m)


def _with_inf_bn(m: onnx.ModelProto) -> None:
    _set_array("gamma", np.where(np.arange(16) == 2, np.inf, 1.0).astype(np.float32))(m)


def _with_zero_var_eps(m: onnx.ModelProto) -> None:
    # var + epsilon == 0: the BN scale is infinite.
    _set_array("var", np.zeros(16, np.float32))(m)
    node(m, "bn1").attribute.append(helper.make_attribute("epsilon", 0.0))


def _zero_size_weight(m: onnx.ModelProto) -> None:
    _set_array("W1", np.zeros((0, 3, 3, 3), np.float32))(m)


def _zero_size_data(m: onnx.ModelProto) -> None:
    # dims say 8x3x3x3, the data is empty.
    init(m, "W1").raw_data = b""


def _zero_size_dims_with_data(m: onnx.ModelProto) -> None:
    # dims say 0 elements, the data holds 16 bytes: an unused initializer, refused all the same.
    t = numpy_helper.from_array(np.zeros(0, np.float32), "empty")
    t.raw_data = bytes(16)
    m.graph.initializer.append(t)


def _conv_rank2(m: onnx.ModelProto) -> None:
    _set_array("W1", np.ones((8, 27), np.float32))(m)


def _conv_rank1(m: onnx.ModelProto) -> None:
    _set_array("W2", np.ones(4, np.float32))(m)


def _cycle(m: onnx.ModelProto) -> None:
    # relu1 reads the output of conv2, which reads the output of relu1.
    n = node(m, "relu1")
    n.input[0] = "y"


def _cycle_self(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Add", ["loop", "y"], ["loop"], name="self"))


def _undefined(m: onnx.ModelProto) -> None:
    node(m, "relu1").input[0] = "nothing_defines_this"


def _undefined_output(m: onnx.ModelProto) -> None:
    m.graph.output.append(helper.make_tensor_value_info("ghost", TensorProto.FLOAT, [1]))


def _dup_initializer(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "W1"))


def _dup_node_output(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Relu", ["x"], ["c1"], name="again"))


def _dup_output_redefines_initializer(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Relu", ["x"], ["W2"], name="shadow"))


def _dup_graph_input(m: onnx.ModelProto) -> None:
    m.graph.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]))


def _dup_node_output_same_node(m: onnx.ModelProto) -> None:
    m.graph.node.append(helper.make_node("Split", ["x"], ["s", "s"], name="split", axis=1))


def _absurd_weight_dims(m: onnx.ModelProto) -> None:
    # A scored weight declaring 2**80 elements, with 8 bytes of data.
    t = init(m, "W2")
    del t.dims[:]
    t.dims.extend([2**40, 2**40, 1, 1])
    t.raw_data = bytes(8)


def _absurd_unused_dims(m: onnx.ModelProto) -> None:
    # An initializer nobody reads, with dims whose product overflows int64 (it would be copied to OUT as is).
    t = numpy_helper.from_array(np.zeros(2, np.float32), "huge")
    del t.dims[:]
    t.dims.extend([2**31, 2**31, 2**31])
    m.graph.initializer.append(t)


def _negative_dims(m: onnx.ModelProto) -> None:
    t = numpy_helper.from_array(np.zeros(2, np.float32), "neg")
    del t.dims[:]
    t.dims.extend([-2, -1])
    m.graph.initializer.append(t)


def _absurd_input_dims(m: onnx.ModelProto) -> None:
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2**62, 2**62]))


def _negative_input_dims(m: onnx.ModelProto) -> None:
    m.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, -8, 8]))


def _float_data_short(m: onnx.ModelProto) -> None:
    t = init(m, "W1")
    t.ClearField("raw_data")
    t.float_data.extend([1.0] * 10)


def _undefined_dtype(m: onnx.ModelProto) -> None:
    init(m, "W1").data_type = TensorProto.UNDEFINED


def _unknown_dtype(m: onnx.ModelProto) -> None:
    init(m, "mean").data_type = 999


def _group_as_string(m: onnx.ModelProto) -> None:
    node(m, "conv1").attribute.append(helper.make_attribute("group", b"two"))


def _epsilon_as_list(m: onnx.ModelProto) -> None:
    node(m, "bn1").attribute.append(helper.make_attribute("epsilon", [1e-5, 1e-3]))


def _conv_without_output(m: onnx.ModelProto) -> None:
    n = node(m, "conv1")
    del n.output[:]
    node(m, "bn1").input[0] = "x"


def _no_graph(m: onnx.ModelProto) -> None:
    m.ClearField("graph")


def _invalid_utf8_name(inside: Path, outside: Path) -> Path:
    # protobuf hands a proto2 string that is not UTF-8 to Python as bytes: names must be checked at load.
    data = small_model().SerializeToString().replace(b"relu1", b"rel\xff\xfe")
    return _raw_file(data)(inside, outside)


def _invalid_utf8_location(inside: Path, outside: Path) -> Path:
    m = small_model()
    data = raw_of(m, "W1")
    (inside / "w.bin").write_bytes(data)
    externalize(init(m, "W1"), "w.bin", 0, len(data))
    return _raw_file(m.SerializeToString().replace(b"w.bin", b"\xe9.bin"))(inside, outside)


def _signaling_nan(m: onnx.ModelProto) -> None:
    # A signaling NaN makes numpy warn on every cast: it must be refused like any NaN, without a warning.
    w = numpy_helper.to_array(init(m, "W1")).copy().view(np.uint32)
    w[2, 0, 0, 0] = 0x7F800001
    _set_array("W1", w.view(np.float32))(m)


def _through(op: str, extra_inputs: list[TensorProto], **attrs) -> Callable[[onnx.ModelProto], None]:
    """W1 reaches conv1 through one ``op`` node (a weight chain, as exporters write them)."""

    def fn(m: onnx.ModelProto) -> None:
        m.graph.initializer.extend(extra_inputs)
        m.graph.node.insert(0, helper.make_node(op, ["W1", *(t.name for t in extra_inputs)], ["W1_t"], **attrs))
        node(m, "conv1").input[1] = "W1_t"

    return fn


def _strides_wrong_length(m: onnx.ModelProto) -> None:
    node(m, "conv1").attribute.append(helper.make_attribute("strides", [1]))


def _zero_dilation(m: onnx.ModelProto) -> None:
    node(m, "conv2").attribute.append(helper.make_attribute("dilations", [0, 1]))


# Malformed models that onnx's checker or the channel checks refuse (issue 15, point 6).


def _no_opset_import(m: onnx.ModelProto) -> None:
    del m.opset_import[:]


def _ir_version_too_new(m: onnx.ModelProto) -> None:
    m.ir_version = onnx.IR_VERSION + 1


def _local_functions(m: onnx.ModelProto, bodies: dict[str, list[onnx.NodeProto]], ir_version: int = 10) -> None:
    """Model-local functions ``local.<name>`` (one input a, one output b); relu1 calls the first one."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    m.ir_version = ir_version
    m.opset_import.append(helper.make_opsetid("local", 1))
    for name, body in bodies.items():
        m.functions.append(helper.make_function("local", name, ["a"], ["b"], body, opsets))
    relu = node(m, "relu1")
    relu.op_type, relu.domain = next(iter(bodies)), "local"


def _call(name: str) -> onnx.NodeProto:
    return helper.make_node(name, ["a"], ["b"], domain="local")


def _function_calls_itself(m: onnx.ModelProto) -> None:
    _local_functions(m, {"F": [_call("F")]})


def _functions_call_each_other(m: onnx.ModelProto) -> None:
    _local_functions(m, {"F": [_call("G")], "G": [_call("H")], "H": [_call("F")]})


def _function_calls_itself_in_a_branch(m: onnx.ModelProto) -> None:
    branch = helper.make_graph([_call("F")], "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    other = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])],
        "else",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )
    cond = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True)))
    body = [cond, helper.make_node("If", ["c"], ["b"], then_branch=branch, else_branch=other)]
    _local_functions(m, {"F": body})


def _functions_before_ir_8(m: onnx.ModelProto) -> None:
    _local_functions(m, {"F": [helper.make_node("Relu", ["a"], ["b"])]}, ir_version=7)


def _batchnorm_params_shorter(m: onnx.ModelProto) -> None:
    # 12 values for conv1's 16 channels, the four parameters agreeing with each other
    for name in ("gamma", "beta", "mean", "var"):
        _set_array(name, np.ones(12, np.float32))(m)


def _batchnorm_params_differ(m: onnx.ModelProto) -> None:
    _set_array("mean", np.zeros(15, np.float32))(m)


def _batchnorm_after_relu_too_long(m: onnx.ModelProto) -> None:
    # a second BatchNormalization behind relu1: its channels still come from conv1 (16)
    names = [f"bn2.{p}" for p in ("g", "b", "m", "v")]
    m.graph.initializer.extend(numpy_helper.from_array(np.ones(20, np.float32), n) for n in names)
    m.graph.node.insert(3, helper.make_node("BatchNormalization", ["r1", *names], ["r1b"], name="bn2"))
    node(m, "conv2").input[0] = "r1b"


def _group_vs_input_channels(m: onnx.ModelProto) -> None:
    # conv2's weight (4, 16, 3, 3) with group 2 takes 32 input channels; conv1 gives 16
    node(m, "conv2").attribute.append(helper.make_attribute("group", 2))


def _group_does_not_divide(m: onnx.ModelProto) -> None:
    node(m, "conv1").attribute.append(helper.make_attribute("group", 3))


def _weight_vs_declared_input(m: onnx.ModelProto) -> None:
    # conv1 reads x, declared [1, 3, 8, 8]; a weight (16, 1, 3, 3) with group 1 takes 1 channel
    _set_array("W1", np.ones((16, 1, 3, 3), np.float32))(m)


def _ext_extra_key(key: str, value: str = "1") -> Builder:
    """W1 external in ``w.bin`` with a valid entry plus one more ``key``."""

    def build(inside: Path, outside: Path) -> Path:
        m = small_model()
        data = raw_of(m, "W1")
        (inside / "w.bin").write_bytes(data)
        t = init(m, "W1")
        externalize(t, "w.bin", 0, len(data))
        e = t.external_data.add()
        e.key, e.value = key, value
        return write(inside / "model.onnx", m)

    return build


# name -> builder. Every one of these must give exit code 2 for both commands.
CORPUS: dict[str, Builder] = {
    "empty-file": _raw_file(b""),
    "random-bytes": _random_bytes,
    "truncated-half": _truncated,
    "truncated-last-byte": _truncated_one_byte,
    "tensorproto-not-model": _tensor_proto,
    "graphproto-not-model": _graph_proto,
    "json-text": _text_file,
    "model-without-graph": _edit(_no_graph),
    "nested-subgraphs-150": _nested_ifs,
    "ext-parent-dir": _external_w1(_loc_parent),
    "ext-parent-dir-nested": _external_w1(_loc_parent_nested),
    "ext-parent-dir-backslash": _external_w1(_loc_backslash_parent),
    "ext-absolute": _external_w1(_loc_absolute),
    "ext-symlink-outside": _external_w1(_loc_symlink),
    "ext-symlink-inside": _external_w1(_loc_symlink_inside),
    "ext-symlinked-dir": _external_w1(_loc_symlink_dir),
    "ext-hardlink": _external_w1(_loc_hardlink),
    "ext-fifo": _external_w1(_loc_fifo),
    "ext-directory": _external_w1(_loc_directory),
    "ext-missing-file": _external_w1(_loc_missing),
    "ext-nul-in-location": _external_w1(_loc_nul),
    "ext-past-end": _ext_entry(offset="100"),
    "ext-length-past-end": _ext_entry(length="100000"),
    "ext-negative-offset": _ext_entry(offset="-4"),
    "ext-offset-not-a-number": _ext_entry(offset="zero"),
    "ext-no-location": _ext_entry(location=None),
    "ext-length-not-dims": _ext_dims_mismatch,
    "ext-rest-of-file-not-dims": _ext_no_length_mismatch,
    "ext-in-subgraph": _ext_in_subgraph,
    "ext-in-constant-node": _ext_in_constant,
    "nan-weight": _edit(_with_nan),
    "inf-weight-output-layer": _edit(_with_inf),
    "inf-batchnorm": _edit(_with_inf_bn),
    "batchnorm-zero-variance-and-eps": _edit(_with_zero_var_eps),
    "zero-size-weight": _edit(_zero_size_weight),
    "zero-size-data": _edit(_zero_size_data),
    "zero-dims-with-data": _edit(_zero_size_dims_with_data),
    "conv-weight-rank-2": _edit(_conv_rank2),
    "conv-weight-rank-1": _edit(_conv_rank1),
    "cycle": _edit(_cycle),
    "cycle-self-loop": _edit(_cycle_self),
    "undefined-tensor": _edit(_undefined),
    "undefined-graph-output": _edit(_undefined_output),
    "duplicate-initializer": _edit(_dup_initializer),
    "duplicate-node-output": _edit(_dup_node_output),
    "node-output-shadows-initializer": _edit(_dup_output_redefines_initializer),
    "duplicate-graph-input": _edit(_dup_graph_input),
    "duplicate-output-in-one-node": _edit(_dup_node_output_same_node),
    "absurd-weight-dims": _edit(_absurd_weight_dims),
    "absurd-unused-initializer-dims": _edit(_absurd_unused_dims),
    "negative-initializer-dims": _edit(_negative_dims),
    "absurd-input-dims": _edit(_absurd_input_dims),
    "negative-input-dims": _edit(_negative_input_dims),
    "float-data-too-short": _edit(_float_data_short),
    "undefined-data-type": _edit(_undefined_dtype),
    "unknown-data-type": _edit(_unknown_dtype),
    "conv-group-is-a-string": _edit(_group_as_string),
    "bn-epsilon-is-a-list": _edit(_epsilon_as_list),
    "conv-without-output": _edit(_conv_without_output),
    "invalid-utf8-node-name": _invalid_utf8_name,
    "invalid-utf8-external-location": _invalid_utf8_location,
    "signaling-nan-weight": _edit(_signaling_nan),
    "weight-transpose-bad-perm": _edit(_through("Transpose", [], perm=[0, 0, 1, 2])),
    "weight-unsqueeze-repeated-axes": _edit(_through("Unsqueeze", [numpy_helper.from_array(np.array([0, 0]), "ax")])),
    "weight-squeeze-axis-not-1": _edit(_through("Squeeze", [numpy_helper.from_array(np.array([1]), "ax")])),
    "weight-dequantize-scale-count": _edit(
        _through("DequantizeLinear", [numpy_helper.from_array(np.ones(5, np.float32), "s")], axis=0)
    ),
    "weight-cast-unknown-type": _edit(_through("Cast", [], to=99)),
    "conv-strides-wrong-length": _edit(_strides_wrong_length),
    "conv-zero-dilation": _edit(_zero_dilation),
    "weight-reshape-float-shape": _edit(
        _through("Reshape", [numpy_helper.from_array(np.array([16, np.nan, 3, 3], np.float32), "shape")])
    ),
    "no-opset-import": _edit(_no_opset_import),
    "ir-version-newer-than-onnx": _edit(_ir_version_too_new),
    "function-calls-itself": _edit(_function_calls_itself),
    "functions-call-each-other": _edit(_functions_call_each_other),
    "function-calls-itself-in-a-branch": _edit(_function_calls_itself_in_a_branch),
    "functions-before-ir-8": _edit(_functions_before_ir_8),
    "batchnorm-params-shorter-than-channels": _edit(_batchnorm_params_shorter),
    "batchnorm-params-differ": _edit(_batchnorm_params_differ),
    "batchnorm-after-relu-too-long": _edit(_batchnorm_after_relu_too_long),
    "conv-group-vs-input-channels": _edit(_group_vs_input_channels),
    "conv-group-does-not-divide": _edit(_group_does_not_divide),
    "conv-weight-vs-declared-input": _edit(_weight_vs_declared_input),
    "ext-unknown-key": _ext_extra_key("evil"),
    "ext-duplicate-location": _ext_extra_key("location", "other.bin"),
}


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``root`` (symlinks and FIFOs by their kind, never followed)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "symlink:" + os.readlink(p)
            elif p.is_fifo():
                out[rel] = "fifo"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def build_case(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """The hostile model of ``name`` in ``tmp_path/model/``, and the root to snapshot."""
    inside, outside = tmp_path / "model", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    return CORPUS[name](inside, outside), tmp_path


def invoke(args: list[str]):
    """Run the CLI in this process, with every warning a user would see turned into an error: a warning
    printed on stderr would break the one-line contract."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return RUNNER.invoke(app, args)


def assert_one_error_line(result, code: int = 2) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.parametrize("command", ["sanitize", "sanitize --fuse-bn", "scan"])
def test_hostile_input_exits_2_and_changes_nothing(tmp_path: Path, name: str, command: str) -> None:
    model, root = build_case(tmp_path, name)
    before = snapshot(root)
    out = model.parent / "out.onnx"
    cmd, *options = command.split()
    args = [cmd, str(model)] + ([str(out)] if cmd == "sanitize" else []) + options
    result = invoke(args)
    line = assert_one_error_line(result)
    assert len(line) < 400, line
    assert snapshot(root) == before  # no new file (OUT, OUT.data, temporaries) and nothing changed


@pytest.mark.parametrize(
    "name", [*sorted(n for n in CORPUS if n.startswith("ext-")), "empty-file", "random-bytes", "truncated-half"]
)
def test_evaluate_checks_hostile_files_before_onnxruntime(tmp_path: Path, name: str) -> None:
    """``evaluate`` hands the model to onnxruntime, which would follow a hostile external-data path: the safe
    loader's checks run first, with the same one-line exit-2 error as sanitize."""
    pytest.importorskip("onnxruntime")
    model, root = build_case(tmp_path, name)
    data = tmp_path / "data.npz"
    np.savez(data, x_test=np.zeros((4, 8, 8, 3), np.uint8), y_test=np.arange(4) % 4)
    before = snapshot(root)
    line = assert_one_error_line(invoke(["evaluate", str(model), "--data", str(data)]))
    assert "onnxruntime" not in line, line
    assert snapshot(root) == before


@pytest.mark.parametrize("name", ["empty-file", "random-bytes", "ext-parent-dir", "cycle", "conv-group-is-a-string"])
def test_hostile_input_in_a_real_process(tmp_path: Path, name: str) -> None:
    """The installed entry point, in its own process: exit 2, one line, no traceback."""
    model, root = build_case(tmp_path, name)
    before = snapshot(root)
    out = model.parent / "out.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "onnxclp.cli", "sanitize", str(model), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert snapshot(root) == before


def test_error_messages_name_the_problem(tmp_path: Path) -> None:
    """A few messages, checked for what they say (the user must see what is wrong)."""
    expected = {
        "ext-parent-dir": "leaves the model's folder",
        "ext-absolute": "absolute path",
        "ext-symlink-outside": "symbolic link",
        "ext-hardlink": "hard link",
        "ext-past-end": "outside",
        "ext-length-not-dims": "does not match its dims",
        "cycle": "cycle",
        "undefined-tensor": "nothing defines",
        "duplicate-initializer": "defined twice",
        "nan-weight": "NaN or Inf",
        "conv-weight-rank-2": "rank",
        "empty-file": "empty file",
        "no-opset-import": "must specify opset_import",
        "ir-version-newer-than-onnx": f"ir_version {onnx.IR_VERSION + 1} is higher",
        "function-calls-itself": "recursive (local.F -> local.F)",
        "functions-call-each-other": "recursive (local.F -> local.G -> local.H -> local.F)",
        "function-calls-itself-in-a-branch": "recursive",
        "functions-before-ir-8": "need IR version 8",
        "batchnorm-params-shorter-than-channels": "scale has 12 values but its input has 16 channels",
        "batchnorm-params-differ": "parameters differ in length",
        "batchnorm-after-relu-too-long": "scale has 20 values but its input has 16 channels",
        "conv-group-vs-input-channels": "its input has 16 channels",
        "conv-group-does-not-divide": "group 3 does not divide",
        "conv-weight-vs-declared-input": "graph input 'x' is declared so",
        "ext-unknown-key": "unknown external data key 'evil'",
        "ext-duplicate-location": "'location' appears more than once",
    }
    for name, words in expected.items():
        case = tmp_path / name
        case.mkdir()
        model, _ = build_case(case, name)
        line = assert_one_error_line(invoke(["scan", str(model)]))
        assert words in line, (name, line)


# ---------------------------------------------------------------------------------------------------------------
# Inputs that look unusual but are valid: they must not be refused
# ---------------------------------------------------------------------------------------------------------------


def _outlier_model() -> onnx.ModelProto:
    m = small_model()
    w = numpy_helper.to_array(init(m, "W1")).copy()
    w[5] *= 40.0  # channel 5 is a clear outlier
    _set_array("W1", w)(m)
    return m


def test_unknown_domain_ops_pass_through_untouched(tmp_path: Path) -> None:
    """A node of an unknown domain (even one named Conv) is copied as it is, with its attributes and weights."""
    m = _outlier_model()
    odd = numpy_helper.from_array(np.full((2, 2), 3.0, np.float32), "odd_w")
    m.graph.initializer.append(odd)
    m.graph.node.append(
        helper.make_node(
            "Conv", ["y", "odd_w"], ["z"], name="custom", domain="com.example.secret", anything=b"\x00\xff", k=[1, 2]
        )
    )
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    m.opset_import.append(helper.make_opsetid("com.example.secret", 3))
    src, dst = write(tmp_path / "m.onnx", m), tmp_path / "out.onnx"
    result = invoke(["sanitize", str(src), str(dst)])
    assert result.exit_code == 0, result.stderr
    out = onnx.load(str(dst))
    custom = node(out, "custom")
    assert custom.SerializeToString() == node(m, "custom").SerializeToString()
    assert init(out, "odd_w").SerializeToString() == odd.SerializeToString()
    assert [o.domain for o in out.opset_import] == ["", "com.example.secret"]
    # The standard layer was sanitized all the same.
    w1 = numpy_helper.to_array(init(out, "W1"))
    gamma = numpy_helper.to_array(init(out, "gamma"))
    assert gamma[5] == 0.0 or not w1[5].any()


def test_valid_zero_size_tensor_passes_through(tmp_path: Path) -> None:
    """An empty initializer that is consistent (dims [0], no data), as Resize's ``roi`` often is, is kept."""
    m = _outlier_model()
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "roi"))
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    m.graph.node.append(helper.make_node("Resize", ["y", "roi", "scales"], ["up"], name="resize"))
    m.graph.output.append(helper.make_tensor_value_info("up", TensorProto.FLOAT, None))
    src, dst = write(tmp_path / "m.onnx", m), tmp_path / "out.onnx"
    result = invoke(["sanitize", str(src), str(dst)])
    assert result.exit_code == 0, result.stderr
    assert list(init(onnx.load(str(dst)), "roi").dims) == [0]


def test_packed_4bit_external_tensor_is_accepted(tmp_path: Path) -> None:
    """An INT4 external tensor holds ceil(n / 2) bytes, not n: its length check must know that."""
    m = _outlier_model()
    q = numpy_helper.from_array(np.arange(-4, 3, dtype=np.int8).astype(onnx.helper.tensor_dtype_to_np_dtype(22)), "q")
    assert q.data_type == TensorProto.INT4
    raw = q.raw_data
    assert len(raw) == 4  # 7 values, packed two per byte
    (tmp_path / "q.bin").write_bytes(raw)
    externalize(q, "q.bin", 0, len(raw))
    m.graph.initializer.append(q)
    m.graph.node.append(helper.make_node("Identity", ["q"], ["q_out"], name="keep_q"))
    m.graph.output.append(helper.make_tensor_value_info("q_out", TensorProto.INT4, [7]))
    src, dst = write(tmp_path / "m.onnx", m), tmp_path / "out.onnx"
    _, store = load_model(src)
    np.testing.assert_array_equal(store.read(init(m, "q")).astype(np.int8), np.arange(-4, 3))
    result = invoke(["sanitize", str(src), str(dst)])
    assert result.exit_code == 0, result.stderr
    loaded = onnx.load(str(dst))  # onnx's own loader resolves the output's external data
    np.testing.assert_array_equal(numpy_helper.to_array(init(loaded, "q")).astype(np.int8), np.arange(-4, 3))


def test_external_data_inside_the_folder_is_read(tmp_path: Path) -> None:
    """The safe form of every external case above: a plain file beside the model, in a subfolder."""
    m = _outlier_model()
    data = raw_of(m, "W1")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(bytes(100) + data)
    externalize(init(m, "W1"), "weights/w.bin", 100, len(data))
    src, dst = write(tmp_path / "m.onnx", m), tmp_path / "out.onnx"
    before = snapshot(tmp_path)
    result = invoke(["sanitize", str(src), str(dst)])
    assert result.exit_code == 0, result.stderr
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # inputs unchanged
    assert set(after) - set(before) == {"out.onnx", "out.onnx.data"}


def test_output_must_not_replace_an_input_data_file(tmp_path: Path) -> None:
    """OUT.data (or OUT) that is one of the input's external files would change the input: refused."""
    m = _outlier_model()
    data = raw_of(m, "W1")
    (tmp_path / "out.onnx.data").write_bytes(data)
    externalize(init(m, "W1"), "out.onnx.data", 0, len(data))
    src = write(tmp_path / "m.onnx", m)
    before = snapshot(tmp_path)
    for target in ("out.onnx", "out.onnx.data"):
        result = invoke(["sanitize", str(src), str(tmp_path / target)])
        assert_one_error_line(result)
        assert snapshot(tmp_path) == before


def test_loader_refuses_through_the_api(tmp_path: Path) -> None:
    """The Python API raises OnnxclpError (exit code 2) for the same inputs, nothing else."""
    for name in ("truncated-half", "ext-symlink-outside", "duplicate-graph-input", "conv-without-output"):
        case = tmp_path / name
        case.mkdir()
        model, _ = build_case(case, name)
        from onnxclp import sanitize

        with pytest.raises(OnnxclpError) as info:
            sanitize(model)
        assert info.value.exit_code == 2


@pytest.mark.parametrize("name", ["[/bold]", "[link=http://example.com]x[/link]", "a\nb", "\x1b[2J\x1b[31mred"])
def test_names_from_the_model_are_printed_as_plain_text(tmp_path: Path, name: str) -> None:
    """Node names are data: rich markup in them is not interpreted (``[/bold]`` used to crash the table),
    escape sequences and newlines are shown escaped."""
    m = small_model()
    node(m, "conv1").name = name
    result = invoke(["scan", str(write(tmp_path / "m.onnx", m))])
    assert result.exit_code == 0, result.stderr
    assert "\x1b" not in result.stdout
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    assert shown[:6] in result.stdout


def test_error_line_escapes_control_characters(tmp_path: Path) -> None:
    """A path (or name) with a newline or an escape sequence still gives exactly one printable line."""
    result = invoke(["scan", str(tmp_path / "no\nsuch\x1b[31m.onnx")])
    line = assert_one_error_line(result)
    assert "\\n" in line and "\\x1b" in line and "\x1b" not in line


@pytest.mark.parametrize("part", ["scale", "new-bias"])
def test_batchnorm_fold_that_overflows_is_refused(tmp_path: Path, part: str) -> None:
    """Folding a BatchNormalization whose scale (or, for a Conv without bias, whose shift, which becomes a new
    bias) overflows float32 would write Inf: refused, no warning (the second was a graph-fuzzer find)."""
    m = small_model()
    if part == "scale":
        _set_array("gamma", np.full(16, 3e38, np.float32))(m)
        _set_array("var", np.full(16, 1e-6, np.float32))(m)
    else:
        del node(m, "conv1").input[2:]
        _set_array("mean", np.full(16, 3e38, np.float32))(m)
        _set_array("var", np.full(16, 1e-10, np.float32))(m)
    src = write(tmp_path / "m.onnx", m)
    before = snapshot(tmp_path)
    line = assert_one_error_line(invoke(["sanitize", str(src), str(tmp_path / "out.onnx"), "--fuse-bn"]))
    assert "overflow" in line
    assert snapshot(tmp_path) == before


def test_dequantized_weight_that_overflows_is_refused(tmp_path: Path) -> None:
    """An int8 weight whose DequantizeLinear scale takes it past float32: refused with its name, no warning."""
    m = small_model()
    q = np.full((16, 3, 3, 3), 127, np.int8)
    m.graph.initializer.extend(
        [
            numpy_helper.from_array(q, "W1_q"),
            numpy_helper.from_array(np.array(1e38, np.float32), "W1_scale"),
        ]
    )
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["W1_q", "W1_scale"], ["W1_dq"], name="dq_w1"))
    node(m, "conv1").input[1] = "W1_dq"
    line = assert_one_error_line(invoke(["scan", str(write(tmp_path / "m.onnx", m)), "--method", "lpp"]))
    assert "dq_w1" in line and "Inf" in line


@pytest.mark.parametrize("case", ["float-axes", "cast-overflow"])
def test_hostile_weight_chains_are_refused(tmp_path: Path, case: str) -> None:
    """Two fuzzing finds in the weight chain: a Squeeze whose ``axes`` attribute is a float (a TypeError) and a
    Cast of finite float64 values past float32 (a numpy RuntimeWarning). Both are one error line now. (The
    first is now refused by onnx's checker, in the loader: Squeeze-13 has no ``axes`` attribute.)"""
    m = small_model()
    w = numpy_helper.to_array(init(m, "W1"))
    if case == "float-axes":
        stored = numpy_helper.from_array(w[..., None], "W1_stored")
        chain = helper.make_node("Squeeze", ["W1_stored"], ["W1_w"], name="sq")
        chain.attribute.append(helper.make_attribute("axes", float("inf")))
        expected = "Unrecognized attribute: axes for operator Squeeze"
    else:
        stored = numpy_helper.from_array(np.full(w.shape, 1e300), "W1_stored")
        chain = helper.make_node("Cast", ["W1_stored"], ["W1_w"], name="cast", to=TensorProto.FLOAT)
        expected = "does not fit float32 (overflow)"
    m.graph.initializer.append(stored)
    m.graph.node.insert(0, chain)
    node(m, "conv1").input[1] = "W1_w"
    line = assert_one_error_line(invoke(["scan", str(write(tmp_path / "m.onnx", m))]))
    assert expected in line, line


def test_an_identity_of_another_domain_without_input_is_not_followed(tmp_path: Path) -> None:
    """A graph-fuzzer find: a custom-domain node named Identity, with no input, in front of a weight. It is not
    the standard Identity (not checked, not followed): the layer is skipped with a reason, nothing crashes."""
    m = small_model()
    m.graph.node.insert(0, helper.make_node("Identity", [], ["W1x"], name="custom", domain="x"))
    node(m, "conv1").input[1] = "W1x"
    m.opset_import.append(helper.make_opsetid("x", 1))
    result = invoke(["scan", str(write(tmp_path / "m.onnx", m))])
    assert result.exit_code == 0, result.stderr
    assert "conv1" in result.stdout and "not a constant" in " ".join(result.stdout.split())


def test_scores_that_overflow_are_refused(tmp_path: Path) -> None:
    """float64 weights near their limit: a channel's norm overflows to Inf; refused, not reported as Inf."""
    rng = np.random.default_rng(0)
    w = rng.uniform(1e307, 1e308, (16, 3, 3, 3))
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "double",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 4, 8, 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)), "W2")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    line = assert_one_error_line(invoke(["scan", str(write(tmp_path / "m.onnx", m)), "--method", "lpp"]))
    assert "'conv'" in line and "overflow" in line


def _lying_value_info_model() -> onnx.ModelProto:
    """A value_info declaring 2**40 elements for an activation that feeds an Add."""
    m = small_model()
    m.graph.node.append(helper.make_node("Relu", ["r1"], ["lie"], name="lie"))
    m.graph.node.append(helper.make_node("Add", ["lie", "lie"], ["z"], name="add"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    m.graph.value_info.append(helper.make_tensor_value_info("lie", TensorProto.FLOAT, [2**40]))
    return m


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def test_exact_score_survives_a_lying_value_info(tmp_path: Path) -> None:
    """onnx's data propagation materialises a value_info of 2**40 elements until memory runs out (found by
    bench/fuzz.py: 10 GB in a minute); the exact score's shape inference must not use it. Run under a 3 GiB
    address-space limit, so that a regression fails fast instead of exhausting the machine."""
    src = write(tmp_path / "m.onnx", _lying_value_info_model())
    proc = subprocess.run(
        [sys.executable, "-m", "onnxclp.cli", "scan", str(src), "--score", "exact", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())[0]["report"]
    assert [layer["score"] for layer in report["layers"]] == ["exact", "exact"]


@pytest.mark.parametrize(("depth", "reuse"), [(3000, False), (60, True)])
def test_deeply_nested_weight_chain_is_skipped_not_crashed(tmp_path: Path, depth: int, reuse: bool) -> None:
    """A Reshape whose shape comes from a Reshape whose shape comes from ... (found while fuzzing): 3000 levels
    overflowed the stack (RecursionError, exit 4); 60 levels each reusing the previous value twice would take
    2**60 steps. Past onnxclp's nesting limit the weight is not a constant: that layer is skipped."""
    m = small_model()
    m.graph.initializer.append(numpy_helper.from_array(np.array([16, 3, 3, 3], np.int64), "s0"))
    chain = [
        helper.make_node("Reshape", [f"s{i - 1}" if reuse else "s0", f"s{i - 1}"], [f"s{i}"]) for i in range(1, depth)
    ]
    chain.append(helper.make_node("Reshape", ["W1", f"s{depth - 1}"], ["W1r"]))
    for n in reversed(chain):
        m.graph.node.insert(0, n)
    node(m, "conv1").input[1] = "W1r"
    src = write(tmp_path / "m.onnx", m)
    result = invoke(["scan", str(src), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())[0]["report"]
    assert [layer["node"] for layer in report["layers"]] == ["conv2"]
    assert "not a constant" in report["skipped"][0]["reason"]
