"""Build the golden models and record what onnxclp does to them (run once, before a refactor).

Inputs (committed beside this script, so the golden test does not depend on the exporter's version):
- ``resnet.torchscript.onnx`` / ``resnet.dynamo.onnx``: tests/torch_models.SmallResNet (width 8, BatchNorm
  statistics randomised with two outlier channels), exported by both torch exporters;
- ``vgg.torchscript.onnx``: VGGBN, BatchNorm kept (exported in training-free eval mode with
  ``do_constant_folding=False`` so the BatchNormalization nodes stay in the graph);
- ``keras_cnn.onnx``: the tf2onnx fixture of tests/models;
- ``qdq.onnx``: a Conv behind a per-channel DequantizeLinear, built with onnx.helper.

``expected.json`` holds, for each (model, method, fuse_bn), the SHA-256 of the sanitized file and the report
without its timings. ``python tests/golden/make_golden.py --record`` rewrites it from the current code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = Path(__file__).parent
CASES = [
    (model, method, fuse)
    for model in ("resnet.torchscript.onnx", "resnet.dynamo.onnx", "vgg.torchscript.onnx", "keras_cnn.onnx", "qdq.onnx")
    for method in ("clp", "lpp")
    for fuse in (False, True)
]
VOLATILE = {"time_s", "input", "output", "written"}


def build_inputs() -> None:
    import torch

    sys.path.insert(0, str(HERE.parent))
    from torch_models import VGGBN, SmallResNet, randomize_bn

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    res = SmallResNet(width=8).eval()
    randomize_bn(res, seed=1, outliers=2)
    torch.onnx.export(res, (x,), str(HERE / "resnet.torchscript.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    torch.onnx.export(res, (x,), str(HERE / "resnet.dynamo.onnx"), dynamo=True, input_names=["x"],
                      output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},))  # fmt: skip
    vgg = VGGBN(width=8).eval()
    randomize_bn(vgg, seed=2, outliers=2)
    torch.onnx.export(vgg, (x,), str(HERE / "vgg.torchscript.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE)  # fmt: skip
    (HERE / "keras_cnn.onnx").write_bytes((HERE.parent / "models" / "keras_cnn.onnx").read_bytes())
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    w[5] *= 6.0
    w[2] *= 1.8
    scale = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    zp = (np.arange(8) - 4).astype(np.int8)
    q = np.clip(np.round(w / scale[:, None, None, None]) + zp[:, None, None, None], -128, 127).astype(np.int8)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "Ws", "Wz"], ["W"], axis=0),
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws"), numpy_helper.from_array(zp, "Wz")],
    )  # fmt: skip
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), HERE / "qdq.onnx")


def run_case(model: str, method: str, fuse: bool) -> dict:
    """Sanitize one golden model; the output's SHA-256 and the report without volatile fields."""
    import onnxclp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        u = 2.0 if model == "qdq.onnx" else None  # 8 channels: a z-score cannot reach 3
        report = onnxclp.sanitize_file(HERE / model, out, method=method, u=u, fuse_bn=fuse)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
    rep = {k: v for k, v in report.to_dict().items() if k not in VOLATILE}
    return {"sha256": digest, "report": json.loads(json.dumps(rep))}


def key(model: str, method: str, fuse: bool) -> str:
    return f"{model}|{method}|{'fuse' if fuse else 'keep'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", action="store_true", help="rebuild the input models (needs torch)")
    ap.add_argument("--record", action="store_true", help="rewrite expected.json from the current code")
    a = ap.parse_args()
    if a.inputs:
        build_inputs()
    if a.record:
        expected = {key(*c): run_case(*c) for c in CASES}
        (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
