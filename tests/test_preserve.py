"""Everything that is not ours survives a sanitize (issue: sanitize item 2), external data included."""

from __future__ import annotations

import json

import numpy as np
import onnx
from builders import init, run
from onnx import helper

import onnxclp


def _rich_model() -> onnx.ModelProto:
    w = np.ones((6, 2, 1, 1), dtype=np.float32)
    w[3] *= 25
    fn = helper.make_function(
        "local.fn",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", doc_string="the conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Double", ["r"], ["y"], name="double", domain="local.fn"),
    ]
    wt = init("W", w)
    wt.doc_string = "conv weight"
    g = helper.make_graph(
        nodes,
        "graph",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6, 4, 4])],
        [wt, init("B", np.arange(6))],
        doc_string="graph doc",
        value_info=[helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["N", 6, 4, 4])],
    )
    m = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)],
        functions=[fn],
        producer_name="tests",
        producer_version="9.9",
        doc_string="model doc",
        domain="org.example",
        model_version=7,
    )
    m.ir_version = 8
    helper.set_model_props(m, {"author": "someone", "license": "MIT"})
    return m


def _strip_ours(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    kept = [p for p in c.metadata_props if not p.key.startswith("onnxclp.")]
    del c.metadata_props[:]
    c.metadata_props.extend(kept)
    for t in c.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
    return c


def test_everything_else_is_preserved(tmp_path):
    m = _rich_model()
    src = tmp_path / "in.onnx"
    onnx.save(m, str(src))
    before = src.read_bytes()
    report = onnxclp.sanitize_file(src, tmp_path / "out.onnx", u=1.5)
    assert report.layers[0].pruned == [3]
    assert src.read_bytes() == before  # the input is never modified
    out = onnx.load(str(tmp_path / "out.onnx"))
    # Apart from the weight values and our metadata, the model is identical field for field.
    assert _strip_ours(out) == _strip_ours(m)
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "someone" and meta["license"] == "MIT"
    assert meta["onnxclp.method"] == "clp" and meta["onnxclp.pruned_channels"] == "1"
    assert meta["onnxclp.version"] == onnxclp.__version__
    assert json.loads(meta["onnxclp.params"])["u"] == 1.5
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 4)).astype(np.float32)
    (c,) = run(out, {"x": x}, ["c"])
    assert np.all(c[:, 3] == 0) and np.all(c[:, [0, 1, 2, 4, 5]] != 0)


def test_resanitizing_updates_our_metadata_in_place(tmp_path):
    src, mid, dst = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    onnx.save(_rich_model(), str(src))
    onnxclp.sanitize_file(src, mid, u=1.5)
    onnxclp.sanitize_file(mid, dst, method="lpp", u=1.5)
    keys = [p.key for p in onnx.load(str(dst)).metadata_props]
    assert len(keys) == len(set(keys))
    assert dict((p.key, p.value) for p in onnx.load(str(dst)).metadata_props)["onnxclp.method"] == "lpp"


def test_external_data_in_and_out(tmp_path):
    m = _rich_model()
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save(
        _rich_model(),
        str(src_dir / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    files_before = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    report = onnxclp.sanitize_file(src_dir / "m.onnx", out_dir / "s.onnx", u=1.5)
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == files_before
    assert sorted(p.name for p in out_dir.iterdir()) == ["s.onnx", "s.onnx.data"]
    assert report.written == [str(out_dir / "s.onnx"), str(out_dir / "s.onnx.data")]
    proto = onnx.load(str(out_dir / "s.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    in_memory, _ = onnxclp.sanitize(m, u=1.5)
    full = onnx.load(str(out_dir / "s.onnx"))
    for a, b in zip(full.graph.initializer, in_memory.graph.initializer, strict=True):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    onnx.checker.check_model(str(out_dir / "s.onnx"), full_check=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out_dir / "s.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.ones((1, 2, 4, 4), np.float32)})[0]
    np.testing.assert_array_equal(y, run(in_memory, {"x": np.ones((1, 2, 4, 4), np.float32)})[0])


def test_float16_weights_are_written_back_in_float16():
    m = _rich_model()
    for t in m.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    out, rep = onnxclp.sanitize(m, u=1.5)
    assert rep.layers[0].pruned == [3]
    w = next(t for t in out.graph.initializer if t.name == "W")
    assert w.data_type == onnx.TensorProto.FLOAT16
    assert np.all(onnx.numpy_helper.to_array(w)[3] == 0)
