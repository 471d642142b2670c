"""Small ONNX graphs built with onnx.helper, and an onnxruntime runner, for exact tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def init(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, **kw) -> onnx.ModelProto:
    """A model from nodes; inputs/outputs are (name, shape) pairs (float32)."""
    g = helper.make_graph(
        nodes,
        kw.pop("graph_name", "g"),
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        list(initializers),
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], **kw)
    m.ir_version = 8
    return m


def run(m: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run with onnxruntime on CPU; ``outputs`` may name intermediate tensors (added as graph outputs)."""
    import onnxruntime as ort

    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    have = {o.name for o in m2.graph.output}
    for name in outputs or []:
        if name not in have:
            m2.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m2.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def conv_bn(
    w: np.ndarray,
    gamma,
    beta=None,
    mean=None,
    var=None,
    eps: float = 1e-5,
    bias=None,
    group: int = 1,
    spatial: tuple[int, ...] = (6, 6),
) -> onnx.ModelProto:
    """x -> Conv(w) -> BatchNormalization -> Relu -> y."""
    k = w.shape[0]
    beta = np.zeros(k) if beta is None else beta
    mean = np.zeros(k) if mean is None else mean
    var = np.ones(k) if var is None else var
    inits = [init("W", w), init("gamma", gamma), init("beta", beta), init("mean", mean), init("var", var)]
    conv_in = ["x", "W"]
    if bias is not None:
        inits.append(init("B", bias))
        conv_in.append("B")
    pads = [1] * (2 * len(spatial)) if w.shape[2] == 3 else [0] * (2 * len(spatial))
    nodes = [
        helper.make_node("Conv", conv_in, ["c"], name="conv", group=group, pads=pads),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"], name="bn", epsilon=eps),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    cin = w.shape[1] * group
    return model(nodes, [("x", ["N", cin, *spatial])], [("y", ["N", k, *spatial])], inits)


def cli_heavy_imports(args: list[str]) -> dict:
    """Run ``onnxclp <args>`` in a fresh interpreter: its exit code and which of torch and onnxruntime it imported
    (``{"exit": 0, "heavy": []}`` for a weight-only command; startup time matters in CI)."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys; from onnxclp.cli import app\n"
        f"try:\n    app({[str(a) for a in args]!r})\n    code = 0\n"
        "except SystemExit as exc:\n    code = exc.code or 0\n"
        "print(json.dumps({'exit': code, 'heavy': sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules)}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])
