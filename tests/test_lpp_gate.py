"""``lpp-gate`` (onnxclp/methods/lpp_gate.py): LPP's pruned network behind the target gate, from the weights alone.

A hand-built backdoor with a known answer: one convolution channel amplified twenty-fold (LPP's upper tail prunes
it) feeds only the classifier's class-0 row (the classifier's anomaly index names class 0). An input that lights
that channel is answered 0 by the input network; the written model answers as LPP's pruned network there, and as
the input network wherever the input says another class. onnxruntime is the judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import cli_heavy_imports, init, model
from onnx import helper, numpy_helper

import onnxclp
from onnxclp.errors import OnnxclpError

HOT = 5


def _backdoored() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 3, 3, 3)).astype(np.float32) * 0.3
    w[HOT] *= 20.0
    fc = rng.normal(size=(4, 16)).astype(np.float32) * 0.2
    fc[:, HOT] = 0.0
    fc[0, HOT] = 3.0  # the hot channel votes for class 0 alone
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "F", "G"], ["y"], name="fc", transB=1),
    ]
    inits = [init("W", w), init("B", np.zeros(16)), init("F", fc), init("G", np.zeros(4))]
    return model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 4])], inits)


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_the_pruned_copy_answers_only_where_the_input_says_the_suspect():
    pytest.importorskip("onnxruntime")
    m = _backdoored()
    out, rep = onnxclp.sanitize(m, method="lpp-gate")
    pruned, _ = onnxclp.sanitize(m, method="lpp")
    assert HOT in rep.layers[0].pruned  # the report's channels are the copy's
    before = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert all(np.array_equal(after[n], v) for n, v in before.items())  # the input network unchanged
    assert any(n.startswith("onnxclp.gate/") for n in after)
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(0).normal(size=(400, 3, 8, 8)).astype(np.float32)
    x[:100] += 1.0  # brighter images light the hot channel: the input says 0
    y_in, y_gate, y_copy = (_run(g, x).argmax(1) for g in (m, out, pruned))
    assert (y_in == 0).sum() > 50 and (y_copy[y_in == 0] != 0).any()
    expected = np.where((y_in == 0) & (y_copy != 0), y_copy, y_in)
    np.testing.assert_array_equal(y_gate, expected)
    assert any("copy" in n and "class 0" in n for n in rep.notes)


def test_a_model_whose_classifier_cannot_be_read_is_refused():
    m = _backdoored()
    nodes = list(m.graph.node)[:2]  # the Relu's map is the output: no classifier layer
    graph = helper.make_graph(nodes, "g", list(m.graph.input), [helper.make_tensor_value_info("r", 1, None)],
                              list(m.graph.initializer)[:2])  # fmt: skip
    bad = helper.make_model(graph, opset_imports=list(m.opset_import))
    with pytest.raises(OnnxclpError) as err:
        onnxclp.sanitize(bad, method="lpp-gate")
    assert err.value.exit_code == 3 and "classifier" in err.value.message


def test_lpp_gate_does_not_import_torch_or_onnxruntime(tmp_path: Path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_backdoored(), str(src))
    assert cli_heavy_imports(["sanitize", src, out, "--method", "lpp-gate", "-q"]) == {"exit": 0, "heavy": []}
    assert out.exists()
