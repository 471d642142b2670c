"""Finding scored layers and the per-channel affine that follows each one (docs/algorithms.md, "Channels").

A *scored layer* is a Conv (any spatial rank, grouped, depthwise), ConvTranspose, Gemm or MatMul whose
weight is a constant. Each output channel ``k`` has a kernel slice ``W_k``; this module knows how to view a
stored weight as ``(K, ...)`` with the output channel first (:class:`WeightLayout`) and back. Pairing is by
data flow: a BatchNormalization that is the only consumer of the layer's output, or a Mul by per-channel
constants (optionally followed by an Add of per-channel constants). A layer that cannot be handled is
returned as a :class:`SkippedLayer` with the reason.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import NodeProto

from onnxclp import weights
from onnxclp.graph import ConstSource, GraphIndex
from onnxclp.io import TensorStore
from onnxclp.report import SkippedLayer

SCORED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_ONNX_DOMAINS = ("", "ai.onnx")


def attr(node: NodeProto, name: str, default=None):
    """A node attribute's Python value, or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class WeightLayout:
    """How a stored weight maps to the canonical ``(K, C_in/g, *kernel)`` view (docs/algorithms.md, "Channels").

    ``kind`` is ``conv`` (weight (K, C_in/g, k...)), ``convtranspose`` (weight (C_in, K/g, k...)),
    ``rows`` (an FC weight whose rows are output channels) or ``cols`` (columns are output channels).
    """

    kind: str
    group: int = 1

    def to_channels(self, w: np.ndarray) -> np.ndarray:
        """Stored weight -> canonical array with the output channel on axis 0."""
        if self.kind == "conv":
            return w
        if self.kind == "rows":
            return w[:, None, :]
        if self.kind == "cols":
            return w.T[:, None, :]
        g = self.group
        cin, kg = w.shape[0], w.shape[1]
        v = w.reshape((g, cin // g, kg, *w.shape[2:]))
        v = np.swapaxes(v, 1, 2)
        return v.reshape((g * kg, cin // g, *w.shape[2:]))

    def from_channels(self, c: np.ndarray, stored_shape: tuple[int, ...]) -> np.ndarray:
        """Inverse of :meth:`to_channels`."""
        if self.kind == "conv":
            return c.reshape(stored_shape)
        if self.kind == "rows":
            return c[:, 0, :].reshape(stored_shape)
        if self.kind == "cols":
            return np.ascontiguousarray(c[:, 0, :].T).reshape(stored_shape)
        g = self.group
        cin, kg = stored_shape[0], stored_shape[1]
        v = c.reshape((g, kg, cin // g, *tuple(stored_shape[2:])))
        v = np.swapaxes(v, 1, 2)
        return np.ascontiguousarray(v).reshape(stored_shape)

    def channel_count(self, shape: tuple[int, ...]) -> int:
        """Number of output channels of a weight of this shape."""
        if self.kind == "conv" or self.kind == "rows":
            return shape[0]
        if self.kind == "cols":
            return shape[1]
        return shape[1] * self.group


@dataclass
class PerChannel:
    """A constant that holds one value per output channel (a bias or an affine scale/shift)."""

    src: ConstSource
    node: NodeProto  # the node that reads it
    input_index: int


@dataclass
class Affine:
    """The per-channel affine paired with a layer: ``y_k = scale_k * x_k + shift_k``."""

    kind: str  # "BatchNormalization" or "Mul"
    nodes: list[NodeProto]
    scale: PerChannel | None = None  # BN gamma or Mul constant
    shift: PerChannel | None = None  # BN beta or Add constant
    mean: PerChannel | None = None  # BN only
    var: PerChannel | None = None  # BN only
    epsilon: float = 1e-5


@dataclass
class Layer:
    """One scored layer: its node, weight, bias, paired affine and role in the graph."""

    key: str
    node: NodeProto
    weight: ConstSource
    weight_index: int
    layout: WeightLayout
    channels: int
    weight_shape: tuple[int, ...]
    bias: PerChannel | None = None
    bias_node: NodeProto | None = None  # an Add after a MatMul that carries the bias
    affine: Affine | None = None
    output: str = ""  # the tensor after bias and affine: where channel k's pre-activation lives
    is_fc: bool = False
    is_output: bool = False  # produces a model output without another scored layer between
    input_name: str = ""

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def affine_key(self) -> str | None:
        return ", ".join(n.name or n.op_type for n in self.affine.nodes) if self.affine else None


@dataclass
class LayerSet:
    """All scored layers of a graph, and everything skipped with its reason."""

    layers: list[Layer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)


def _per_channel(
    index: GraphIndex, store: TensorStore, node: NodeProto, input_index: int, channels: int, axis: int, rank: int | None
) -> PerChannel | None:
    """The constant at ``node.input[input_index]`` if it holds exactly one value per channel on ``axis``.

    ``axis`` counts from the end (-1 last); ``rank`` is the rank of the tensor it broadcasts against, if
    known. A constant whose dims are all 1 but one equal to ``channels`` at ``axis`` qualifies.
    """
    if input_index >= len(node.input) or not node.input[input_index]:
        return None
    src = index.constant(node.input[input_index])
    if src is None:
        return None
    shape, is_float = value_info(index, store, src)
    if not is_float:
        return None
    dims = list(shape)
    if int(np.prod(dims, dtype=np.int64)) != channels or not dims:
        return None
    if rank is not None and len(dims) > rank:
        return None
    if len(dims) < -axis:
        return None
    if dims[axis] != channels or any(d != 1 for i, d in enumerate(dims) if i != len(dims) + axis):
        return None
    return PerChannel(src, node, input_index)


def value_info(index: GraphIndex, store: TensorStore, src: ConstSource) -> tuple[tuple[int, ...], bool]:
    """Shape of the value a reader sees, and whether it is floating point (through any transform chain)."""
    if src.plain:
        return tuple(int(d) for d in src.tensor.dims), src.tensor.data_type in _FLOAT_TYPES
    value = weights.read(index, store, src)
    return tuple(value.shape), value.dtype.kind == "f"


_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


def _pair_affine(
    index: GraphIndex, store: TensorStore, name: str, channels: int, axis: int, rank: int | None, allow_bn: bool
):
    """The affine consuming tensor ``name`` (the layer's output), or None."""
    node = index.only_consumer(name)
    if node is None or node.domain not in _ONNX_DOMAINS:
        return None
    if node.op_type == "BatchNormalization" and allow_bn and node.input[0] == name:
        if attr(node, "training_mode", 0) or sum(1 for o in node.output if o) != 1 or len(node.input) != 5:
            return None
        parts = [_per_channel(index, store, node, i, channels, -1, 1) for i in range(1, 5)]
        if any(p is None for p in parts):
            return None
        return Affine(
            "BatchNormalization",
            [node],
            parts[0],
            parts[1],
            parts[2],
            parts[3],
            float(attr(node, "epsilon", 1e-5)),
        )
    if node.op_type == "Mul":
        other = 1 if node.input[0] == name else 0
        scale = _per_channel(index, store, node, other, channels, axis, rank)
        if scale is None:
            return None
        aff = Affine("Mul", [node], scale=scale)
        add = index.only_consumer(node.output[0])
        if add is not None and add.op_type == "Add" and add.domain in _ONNX_DOMAINS:
            other = 1 if add.input[0] == node.output[0] else 0
            shift = _per_channel(index, store, add, other, channels, axis, rank)
            if shift is not None:
                aff.nodes.append(add)
                aff.shift = shift
        return aff
    return None


# Hidden-layer activations: a layer whose path to the model output crosses one of these is not the classifier.
# (Softmax, LogSoftmax and Sigmoid are output activations and do not stop the search.)
HIDDEN_ACTIVATIONS = frozenset(
    [
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "HardSwish",
        "HardSigmoid",
        "Clip",
        "Tanh",
        "Mish",
        "Softplus",
        "Softsign",
        "ThresholdedRelu",
        "Swish",
    ]
)


def _output_layers(index: GraphIndex) -> set[int]:
    """ids of scored-op nodes that produce a model output: the classifier (docs/algorithms.md, "Channels").

    Searches back from the graph outputs; the search stops at scored ops (found) and at hidden-layer
    activations (a layer behind a Relu is a feature layer, not the classifier).
    """
    found: set[int] = set()
    seen: set[str] = set()
    queue = deque(index.graph_outputs)
    while queue:
        name = queue.popleft()
        if name in seen:
            continue
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            continue
        if node.op_type in SCORED_OPS and node.domain in _ONNX_DOMAINS:
            found.add(id(node))
            continue
        if node.op_type in HIDDEN_ACTIVATIONS:
            continue
        queue.extend(x for x in node.input if x)
    return found


def _final_output(layer: Layer) -> str:
    if layer.affine is not None:
        return layer.affine.nodes[-1].output[0]
    if layer.bias_node is not None:
        return layer.bias_node.output[0]
    return layer.node.output[0]


def find_layers(index: GraphIndex, store: TensorStore) -> LayerSet:
    """Every Conv/ConvTranspose/Gemm/MatMul of the graph, as a scored :class:`Layer` or a :class:`SkippedLayer`."""
    result = LayerSet()
    outputs = _output_layers(index)
    for node in index.graph.node:
        if node.op_type not in SCORED_OPS or node.domain not in _ONNX_DOMAINS:
            continue
        key = index.node_key(node)
        found = _make_layer(index, store, node, key)
        if isinstance(found, SkippedLayer):
            if node.op_type == "MatMul" and found.reason == _NO_CONST_MATMUL:
                continue  # activation x activation (attention scores): not a layer with weights
            result.skipped.append(found)
            continue
        found.is_output = id(node) in outputs or (
            found.bias_node is not None and found.bias_node.output[0] in index.graph_outputs
        )
        found.output = _final_output(found)
        result.layers.append(found)
    return result


_NO_CONST_MATMUL = "neither operand is a constant"


def _make_layer(index: GraphIndex, store: TensorStore, node: NodeProto, key: str) -> Layer | SkippedLayer:
    op = node.op_type
    if op in ("Conv", "ConvTranspose"):
        return _conv_layer(index, store, node, key)
    if op == "Gemm":
        return _gemm_layer(index, store, node, key)
    return _matmul_layer(index, store, node, key)


def _weight(index: GraphIndex, store: TensorStore, node: NodeProto, i: int, key: str) -> ConstSource | SkippedLayer:
    name = node.input[i] if i < len(node.input) else ""
    if not name:
        return SkippedLayer(key, node.op_type, f"input {i} (weight) is missing")
    if index.is_graph_input_initializer(name):
        return SkippedLayer(
            key, node.op_type, "weight is an initializer that is also a graph input (not constant)", name
        )
    src = index.constant(name)
    if src is None:
        producer = index.producer.get(name)
        how = f"produced by {producer.op_type} node {index.node_key(producer)!r}" if producer else "not constant"
        return SkippedLayer(key, node.op_type, f"weight {name!r} is not a constant ({how})", name)
    _, is_float = value_info(index, store, src)
    if not is_float:
        dtype = onnx.TensorProto.DataType.Name(src.tensor.data_type)
        return SkippedLayer(key, node.op_type, f"weight has data type {dtype}, not floating point", name)
    return src


def _conv_layer(index: GraphIndex, store: TensorStore, node: NodeProto, key: str) -> Layer | SkippedLayer:
    op = node.op_type
    src = _weight(index, store, node, 1, key)
    if isinstance(src, SkippedLayer):
        return src
    shape = value_info(index, store, src)[0]
    group = int(attr(node, "group", 1))
    if len(shape) < 3:
        return SkippedLayer(
            key, op, f"weight of rank {len(shape)}: a convolution weight has rank >= 3", src.tensor.name
        )
    if group < 1 or (op == "ConvTranspose" and shape[0] % group):
        return SkippedLayer(key, op, f"group {group} does not divide the weight's shape {list(shape)}", src.tensor.name)
    if op == "Conv" and shape[0] % group:
        return SkippedLayer(key, op, f"group {group} does not divide {shape[0]} output channels", src.tensor.name)
    if 0 in shape:
        return SkippedLayer(key, op, f"weight has an empty dimension {list(shape)}", src.tensor.name)
    layout = WeightLayout("conv" if op == "Conv" else "convtranspose", group)
    k = layout.channel_count(shape)
    rank = len(shape)
    layer = Layer(key, node, src, 1, layout, k, shape, input_name=node.input[0])
    if len(node.input) > 2 and node.input[2]:
        bias = _per_channel(index, store, node, 2, k, -1, 1)
        if bias is None:
            return SkippedLayer(key, op, "bias is not a constant vector with one value per channel", src.tensor.name)
        layer.bias = bias
    layer.affine = _pair_affine(index, store, node.output[0], k, -(rank - 1), rank, allow_bn=True)
    return layer


def _gemm_layer(index: GraphIndex, store: TensorStore, node: NodeProto, key: str) -> Layer | SkippedLayer:
    if attr(node, "transA", 0) not in (0, 1):
        return SkippedLayer(key, "Gemm", "unsupported transA")
    src = _weight(index, store, node, 1, key)
    if isinstance(src, SkippedLayer):
        if index.constant(node.input[0]) is not None:
            return SkippedLayer(key, "Gemm", "constant operand A with a variable B is not supported", node.input[0])
        return src
    shape = value_info(index, store, src)[0]
    if len(shape) != 2 or 0 in shape:
        return SkippedLayer(key, "Gemm", f"weight B has shape {list(shape)}, not a 2-D matrix", src.tensor.name)
    layout = WeightLayout("rows" if attr(node, "transB", 0) else "cols")
    k = layout.channel_count(shape)
    layer = Layer(key, node, src, 1, layout, k, shape, is_fc=True, input_name=node.input[0])
    if len(node.input) > 2 and node.input[2]:
        bias = _per_channel(index, store, node, 2, k, -1, 2)
        if bias is None:
            return SkippedLayer(key, "Gemm", "C is not a constant with one value per output channel", src.tensor.name)
        layer.bias = bias
    layer.affine = _pair_affine(index, store, node.output[0], k, -1, 2, allow_bn=True)
    return layer


def _matmul_layer(index: GraphIndex, store: TensorStore, node: NodeProto, key: str) -> Layer | SkippedLayer:
    if len(node.input) != 2:
        return SkippedLayer(key, "MatMul", "MatMul without two inputs")
    consts = [index.constant(x) is not None and not index.is_graph_input_initializer(x) for x in node.input]
    if consts[0] and consts[1]:
        return SkippedLayer(key, "MatMul", "both operands are constant (constant folding left undone)")
    if not (consts[0] or consts[1]):
        for x in node.input:
            if index.is_graph_input_initializer(x):
                return SkippedLayer(
                    key, "MatMul", "weight is an initializer that is also a graph input (not constant)", x
                )
        return SkippedLayer(key, "MatMul", _NO_CONST_MATMUL)
    wi = 1 if consts[1] else 0
    src = _weight(index, store, node, wi, key)
    if isinstance(src, SkippedLayer):
        return src
    shape = value_info(index, store, src)[0]
    if len(shape) != 2 or 0 in shape:
        return SkippedLayer(
            key, "MatMul", f"constant operand has shape {list(shape)}, not a 2-D matrix", src.tensor.name
        )
    # MatMul(X, W[in, out]): output channel = column, on the last axis.
    # MatMul(W[out, in], X): output channel = row, on axis -2.
    layout = WeightLayout("cols" if wi == 1 else "rows")
    axis = -1 if wi == 1 else -2
    k = layout.channel_count(shape)
    layer = Layer(key, node, src, wi, layout, k, shape, is_fc=True, input_name=node.input[1 - wi])
    out = node.output[0]
    add = index.only_consumer(out)
    if add is not None and add.op_type == "Add" and add.domain in _ONNX_DOMAINS:
        other = 1 if add.input[0] == out else 0
        bias = _per_channel(index, store, add, other, k, axis, None)
        if bias is not None:
            layer.bias = bias
            layer.bias_node = add
            out = add.output[0]
    layer.affine = _pair_affine(index, store, out, k, axis, None, allow_bn=False)
    return layer


def find_nested(model: onnx.ModelProto) -> list[SkippedLayer]:
    """Scored-op nodes inside subgraphs (If/Loop/Scan bodies) and model-local functions, as skips.

    onnxclp sanitizes the main graph; a layer in a body or a function is reported, never silently ignored.
    """
    skips: list[SkippedLayer] = []

    def walk(graph: onnx.GraphProto, where: str) -> None:
        for pos, node in enumerate(graph.node):
            if where and node.op_type in SCORED_OPS and node.domain in _ONNX_DOMAINS:
                key = node.name or f"{node.op_type}#{pos}"
                skips.append(
                    SkippedLayer(f"{where}/{key}", node.op_type, f"inside {where}: subgraphs are not sanitized yet")
                )
            for a in node.attribute:
                label = f"{node.op_type} {node.name or '#' + str(pos)!s} attribute {a.name}"
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, f"{where}/{label}" if where else label)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for i, g in enumerate(a.graphs):
                        walk(g, f"{where}/{label}[{i}]" if where else f"{label}[{i}]")

    walk(model.graph, "")
    for f in model.functions:
        for pos, node in enumerate(f.node):
            if node.op_type in SCORED_OPS and node.domain in _ONNX_DOMAINS:
                key = node.name or f"{node.op_type}#{pos}"
                skips.append(
                    SkippedLayer(
                        f"function {f.domain}.{f.name}/{key}",
                        node.op_type,
                        "inside a model-local function (its weights are function inputs or shared by every call); "
                        "use --inline-functions to inline the calls and score them",
                    )
                )
    return skips
