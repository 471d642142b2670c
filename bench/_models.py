"""ResNet-shaped ONNX models with random weights, built with onnx.helper (no torch, no downloads).

BatchNorm is folded into the Conv weights and biases, as both torch exporters write it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, relu: bool = True) -> str:
        w = self.rng.normal(0, np.sqrt(2 / (cin * k * k)), (cout, cin, k, k)).astype(np.float32)
        w *= self.rng.uniform(0.5, 1.5, (cout, 1, 1, 1)).astype(np.float32)  # folded BN scale
        wn, bn, out = self.name("W"), self.name("B"), self.name("conv")
        self.inits += [
            numpy_helper.from_array(w, wn),
            numpy_helper.from_array(self.rng.normal(0, 0.1, cout).astype(np.float32), bn),
        ]
        self.nodes.append(
            helper.make_node("Conv", [x, wn, bn], [out], name=out, pads=[k // 2] * 4, strides=[stride] * 2)
        )
        return self.relu(out) if relu else out

    def relu(self, x: str) -> str:
        out = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    def add_relu(self, a: str, b: str) -> str:
        out = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return self.relu(out)

    def head(self, x: str, cin: int, classes: int) -> str:
        p, f, wn, bn = self.name("pool"), self.name("flat"), self.name("Wfc"), self.name("Bfc")
        self.nodes += [
            helper.make_node("GlobalAveragePool", [x], [p], name=p),
            helper.make_node("Flatten", [p], [f], name=f),
            helper.make_node("Gemm", [f, wn, bn], ["logits"], name="fc", transB=1),
        ]
        self.inits += [
            numpy_helper.from_array(self.rng.normal(0, 0.05, (classes, cin)).astype(np.float32), wn),
            numpy_helper.from_array(np.zeros(classes, np.float32), bn),
        ]
        return "logits"

    def model(self, size: int, classes: int, name: str) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxclp-bench")
        m.ir_version = 8
        return m


def resnet18_cifar(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool), 10 classes: about 11.2 M parameters."""
    b = _Builder(seed)
    x = b.conv("input", 3, 64, 3)
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for i in range(2):
            s = stride if i == 0 else 1
            y = b.conv(x, cin, width, 3, s)
            y = b.conv(y, width, width, 3, 1, relu=False)
            short = b.conv(x, cin, width, 1, s, relu=False) if (s != 1 or cin != width) else x
            x, cin = b.add_relu(y, short), width
    b.head(x, cin, 10)
    return b.model(32, 10, "resnet18_cifar")


def resnet50(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50 (bottleneck blocks 3-4-6-3), 1000 classes: about 25.5 M parameters."""
    b = _Builder(seed)
    x = b.conv("input", 3, 64, 7, 2)
    p = b.name("maxpool")
    b.nodes.append(helper.make_node("MaxPool", [x], [p], name=p, kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = p, 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            y = b.conv(x, cin, width, 1)
            y = b.conv(y, width, width, 3, s)
            y = b.conv(y, width, 4 * width, 1, relu=False)
            short = b.conv(x, cin, 4 * width, 1, s, relu=False) if i == 0 else x
            x, cin = b.add_relu(y, short), 4 * width
    b.head(x, cin, 1000)
    return b.model(224, 1000, "resnet50")


def parameter_count(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer)
