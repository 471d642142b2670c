"""Write a small example CNN to sanitize: ``python examples/make_example_model.py suspect.onnx``.

Conv-BatchNorm-ReLU x 3, global pooling and a classifier, with random weights. In each Conv a few channels get
a kernel with a much larger spectral norm than their neighbours: the signature of the channels a backdoor
trigger relies on (CLP paper, section 3.2). Needs only numpy and onnx.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(seed: int = 0, planted: int = 2) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = "image", 3
    for i, cout in enumerate((32, 64, 64)):
        w = rng.normal(0, np.sqrt(2 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        w[rng.choice(cout, planted, replace=False)] *= 4.0  # the "backdoor" channels
        p = f"block{i}"
        inits += [
            numpy_helper.from_array(w, f"{p}.conv.weight"),
            numpy_helper.from_array(rng.uniform(0.8, 1.2, cout).astype(np.float32), f"{p}.bn.weight"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{p}.bn.bias"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"{p}.bn.running_mean"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"{p}.bn.running_var"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [x, f"{p}.conv.weight"],
                [f"{p}.conv"],
                name=f"{p}.conv",
                pads=[1] * 4,
                strides=[1 if i == 0 else 2] * 2,
            ),
            helper.make_node(
                "BatchNormalization",
                [f"{p}.conv", f"{p}.bn.weight", f"{p}.bn.bias", f"{p}.bn.running_mean", f"{p}.bn.running_var"],
                [f"{p}.bn"],
                name=f"{p}.bn",
            ),
            helper.make_node("Relu", [f"{p}.bn"], [f"{p}.relu"], name=f"{p}.relu"),
        ]
        x, cin = f"{p}.relu", cout
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.1, (10, cin)).astype(np.float32), "fc.weight"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "example_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxclp-example")
    model.ir_version = 8
    helper.set_model_props(model, {"source": "examples/make_example_model.py", "seed": str(seed)})
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", nargs="?", default="suspect.onnx")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    onnx.save(build(args.seed), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
