"""Finding scored layers and the per-channel affine that follows each one (docs/algorithms.md, "Channels").

A *scored layer* is a Conv (any spatial rank, grouped, depthwise), ConvTranspose, Gemm or MatMul whose
weight is a constant. Each output channel ``k`` has a kernel slice ``W_k``; this module knows how to view a
stored weight as ``(K, ...)`` with the output channel first (:class:`WeightLayout`) and back. Pairing is by
data flow: a BatchNormalization that is the only consumer of the layer's output (and the per-channel Mul/Add
that Caffe2 models put after one), or a Mul by per-channel constants (optionally followed by an Add of
per-channel constants); an inference Dropout or an Identity between the layer and its affine is passed through.
A layer that cannot be handled is returned as a :class:`SkippedLayer` with the reason.

Every operator is read at the model's opset (``GraphIndex.opset``): a Mul or Add before opset 7 broadcasts only
with ``broadcast=1`` (and aligns a constant at its ``axis``), Sum broadcasts from opset 8, BatchNormalization
before opset 9 may have ``spatial=0`` (one value per activation: such a layer is skipped), BatchNormalization and
Dropout before opset 7 are in training mode unless ``is_test=1`` (not paired, not passed through), and Dropout
from opset 12 reads ``training_mode`` as an input. Initializers that are graph inputs too (IR version 3, torch's
``keep_initializers_as_inputs=True``) are weights like any other.

The classifier (``Layer.is_output``) is found back from the graph outputs; a 1x1 Conv whose input or output is
globally pooled (SqueezeNet, DenseNet) is treated as the Gemm classifier is (docs/compatibility.md).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import NodeProto

from onnxclp import weights
from onnxclp.graph import ConstSource, GraphIndex
from onnxclp.report import SkippedLayer
from onnxclp.tensors import TensorStore

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
        """Stored weight -> canonical array with the output channel on axis 0.

        ``rows`` also takes a 1x1 convolution's (K, C, 1, 1) weight (a classifier convolution, an FC layer in
        effect): its rows are the output channels.
        """
        if self.kind == "conv":
            return w
        if self.kind == "rows":
            return w.reshape(w.shape[0], 1, -1)
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
    via: list[NodeProto] = field(default_factory=list)  # Identity/inference Dropout between the layer and nodes[0]
    tail_scales: list[PerChannel] = field(default_factory=list)  # a per-channel Mul after a BatchNormalization
    tail_shifts: list[PerChannel] = field(default_factory=list)  # a per-channel Add after a BatchNormalization


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
    known. A constant whose dims are all 1 but one equal to ``channels`` at ``axis`` qualifies. Before opset 7
    a Mul/Add/Sub/Div broadcasts its second input only with ``broadcast=1``, aligned at ``axis`` when given.
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
    legacy = _legacy_broadcast(index, node)
    if legacy is not None:
        broadcast, start = legacy
        if not broadcast or input_index != 1:
            return None  # same shapes required (or the constant is the broadcast target): not per channel
        if start is not None:
            if rank is None:
                return None
            start = start + rank if start < 0 else start
            j = rank + axis - start  # the constant's dim that lines up with the channel axis
            if not 0 <= j < len(dims) or start + len(dims) > rank or dims[j] != channels:
                return None
            return PerChannel(src, node, input_index)
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


# Element-wise ops that broadcast with ``broadcast``/``axis`` attributes before opset 7.
_LEGACY_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def _legacy_broadcast(index: GraphIndex, node: NodeProto) -> tuple[bool, int | None] | None:
    """``(broadcast, axis)`` of a Mul/Add/Sub/Div before opset 7 (None from opset 7: numpy broadcasting)."""
    if index.opset is None or index.opset >= 7 or node.op_type not in _LEGACY_BROADCAST_OPS:
        return None
    axis = attr(node, "axis", None)
    return bool(attr(node, "broadcast", 0)), None if axis is None else int(axis)


def _is_add(index: GraphIndex, node: NodeProto) -> bool:
    """An Add, or a Sum of two inputs where Sum broadcasts (opset 8 on): what adds a per-channel shift."""
    if node.domain not in _ONNX_DOMAINS:
        return False
    if node.op_type == "Add":
        return True
    return node.op_type == "Sum" and len(node.input) == 2 and (index.opset is None or index.opset >= 8)


def inference_dropout(index: GraphIndex, store: TensorStore, node: NodeProto) -> bool:
    """A Dropout that passes its input through unchanged when the model runs, its mask output unread.

    Before opset 7 only with ``is_test=1`` (training mode is its default there); from opset 12 its optional
    ``training_mode`` input must be absent or a constant false.
    """
    if node.op_type != "Dropout" or node.domain not in _ONNX_DOMAINS or not node.input or not node.input[0]:
        return False
    mask = node.output[1] if len(node.output) > 1 else ""
    if mask and (index.consumers.get(mask) or mask in index.graph_outputs):
        return False
    if index.opset is not None and index.opset < 7 and not attr(node, "is_test", 0):
        return False
    if len(node.input) > 2 and node.input[2]:
        src = index.constant(node.input[2])
        if src is None or src.graph_input:
            return False
        value = weights.read(index, store, src)
        if value.size != 1 or bool(value.reshape(-1)[0]):
            return False
    return True


def _pass_through(index: GraphIndex, store: TensorStore, name: str) -> tuple[str, list[NodeProto]]:
    """From the layer's output ``name``, past the Identity and inference Dropout nodes that are its only reader."""
    via: list[NodeProto] = []
    node = index.only_consumer(name)
    while (
        node is not None
        and len(via) < 8
        and ((node.op_type == "Identity" and node.domain in _ONNX_DOMAINS) or inference_dropout(index, store, node))
    ):
        via.append(node)
        name = node.output[0]
        node = index.only_consumer(name)
    return name, via


_FLOAT_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
)


def _pair_affine(
    index: GraphIndex, store: TensorStore, name: str, channels: int, axis: int, rank: int | None, allow_bn: bool
) -> Affine | str | None:
    """The affine consuming tensor ``name`` (the layer's output), None, or why the layer cannot be handled.

    Identity and inference Dropout nodes in between are passed through (``Affine.via``).
    """
    name, via = _pass_through(index, store, name)
    node = index.only_consumer(name)
    if node is None or node.domain not in _ONNX_DOMAINS:
        return None
    if node.op_type == "BatchNormalization" and allow_bn and node.input[0] == name:
        if attr(node, "spatial", 1) != 1:
            return (
                f"its BatchNormalization {index.node_key(node)!r} has spatial=0 (opset < 9: one value per "
                "activation, not per channel)"
            )
        if attr(node, "training_mode", 0) or sum(1 for o in node.output if o) != 1 or len(node.input) != 5:
            return None
        if index.opset is not None and index.opset < 7 and not attr(node, "is_test", 0):
            return None  # before opset 7, training mode unless is_test=1
        parts = [_per_channel(index, store, node, i, channels, -1, 1) for i in range(1, 5)]
        if any(p is None for p in parts):
            return None
        aff = Affine(
            "BatchNormalization",
            [node],
            parts[0],
            parts[1],
            parts[2],
            parts[3],
            float(attr(node, "epsilon", 1e-5)),
            via=via,
        )
        _pair_tail(index, store, aff, channels, axis, rank)
        return aff
    if node.op_type == "Mul":
        other = 1 if node.input[0] == name else 0
        scale = _per_channel(index, store, node, other, channels, axis, rank)
        if scale is None:
            return None
        aff = Affine("Mul", [node], scale=scale, via=via)
        add = index.only_consumer(node.output[0])
        if add is not None and _is_add(index, add):
            other = 1 if add.input[0] == node.output[0] else 0
            shift = _per_channel(index, store, add, other, channels, axis, rank)
            if shift is not None:
                aff.nodes.append(add)
                aff.shift = shift
        return aff
    return None


def _pair_tail(index: GraphIndex, store: TensorStore, aff: Affine, channels: int, axis: int, rank: int | None) -> None:
    """A per-channel Mul, then Add, after a paired BatchNormalization (Caffe2's BN + scale layer): part of the
    affine, so that a zeroed channel stays zero after them (:meth:`onnxclp.edit.Editor.zero_channels`)."""
    out = aff.nodes[-1].output[0]
    mul = index.only_consumer(out)
    if mul is not None and mul.op_type == "Mul" and mul.domain in _ONNX_DOMAINS:
        scale = _per_channel(index, store, mul, 1 if mul.input[0] == out else 0, channels, axis, rank)
        if scale is None:
            return
        aff.nodes.append(mul)
        aff.tail_scales.append(scale)
        out = mul.output[0]
    add = index.only_consumer(out)
    if add is not None and _is_add(index, add):
        shift = _per_channel(index, store, add, 1 if add.input[0] == out else 0, channels, axis, rank)
        if shift is not None:
            aff.nodes.append(add)
            aff.tail_shifts.append(shift)


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


# Global pools: after one, a layer's channels are the model's output values (SqueezeNet: conv -> Relu -> pool).
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
# What may stand between a classifier convolution and the model output once a hidden activation was crossed:
# single-input ops that keep channel k in channel k (or flatten it to column k).
_CLASSIFIER_TAIL = (
    HIDDEN_ACTIVATIONS
    | GLOBAL_POOLS
    | {
        "Identity",
        "Dropout",
        "Softmax",
        "LogSoftmax",
        "Sigmoid",
        "Flatten",
        "Reshape",
        "Squeeze",
        "BatchNormalization",
    }
)


def _output_layers(index: GraphIndex) -> dict[int, bool]:
    """ids of scored-op nodes that produce a model output (the classifier; docs/algorithms.md, "Channels"), each
    with whether a global pool lies between it and the output.

    Searches back from the graph outputs; the search stops at scored ops (found) and at hidden-layer
    activations (a layer behind a Relu is a feature layer, not the classifier), except after a global pool:
    ``conv -> Relu -> GlobalAveragePool -> Softmax`` (SqueezeNet) makes the convolution's channels the classes.
    Past such an activation only a chain of single-input, channel-keeping ops (:data:`_CLASSIFIER_TAIL`) leads
    to a convolution; a merge (Add, Concat) ends it, so a feature extractor's last block is not taken for one.
    """
    found: dict[int, bool] = {}
    seen: set[tuple[str, bool, bool]] = set()
    queue: deque[tuple[str, bool, bool]] = deque((name, False, False) for name in index.graph_outputs)
    while queue:
        item = queue.popleft()
        if item in seen:
            continue
        seen.add(item)
        name, pooled, crossed = item
        node = index.producer.get(name)
        if node is None:
            continue
        if node.op_type in SCORED_OPS and node.domain in _ONNX_DOMAINS:
            if not crossed or node.op_type == "Conv":
                found[id(node)] = found.get(id(node), False) or pooled
            continue
        pooled = pooled or (node.op_type in GLOBAL_POOLS and node.domain in _ONNX_DOMAINS)
        if crossed or node.op_type in HIDDEN_ACTIVATIONS:
            if not pooled or node.op_type not in _CLASSIFIER_TAIL or node.domain not in _ONNX_DOMAINS:
                continue
            if node.input and node.input[0]:
                queue.append((node.input[0], pooled, True))
            continue
        queue.extend((x, pooled, False) for x in node.input if x)
    return found


def _pooled_input(index: GraphIndex, name: str) -> bool:
    """Whether tensor ``name`` comes from a global pool through channel-keeping single-input ops (DenseNet's
    classifier: GlobalAveragePool -> 1x1 Conv)."""
    for _ in range(16):
        node = index.producer.get(name)
        if node is None or node.domain not in _ONNX_DOMAINS or not node.input or not node.input[0]:
            return False
        if node.op_type in GLOBAL_POOLS:
            return True
        if node.op_type not in _CLASSIFIER_TAIL:
            return False
        name = node.input[0]
    return False


def _as_classifier(index: GraphIndex, layer: Layer, pooled: bool) -> None:
    """An output 1x1 Conv (group 1) whose input or output is globally pooled is an FC classifier in effect
    (SqueezeNet, DenseNet, ONNX Model Zoo): it is treated as the Gemm classifier is (rows are classes)."""
    if layer.op != "Conv" or layer.layout.group != 1 or any(d != 1 for d in layer.weight_shape[2:]):
        return
    if pooled or _pooled_input(index, layer.input_name):
        layer.layout = WeightLayout("rows")
        layer.is_fc = True


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
        if found.is_output:
            _as_classifier(index, found, outputs.get(id(node), False))
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
    return _with_affine(layer, _pair_affine(index, store, node.output[0], k, -(rank - 1), rank, allow_bn=True))


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
    return _with_affine(layer, _pair_affine(index, store, node.output[0], k, -1, 2, allow_bn=True))


def _matmul_layer(index: GraphIndex, store: TensorStore, node: NodeProto, key: str) -> Layer | SkippedLayer:
    if len(node.input) != 2:
        return SkippedLayer(key, "MatMul", "MatMul without two inputs")
    consts = [index.constant(x) is not None for x in node.input]
    if consts[0] and consts[1]:
        return SkippedLayer(key, "MatMul", "both operands are constant (constant folding left undone)")
    if not (consts[0] or consts[1]):
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
    if add is not None and _is_add(index, add):
        other = 1 if add.input[0] == out else 0
        bias = _per_channel(index, store, add, other, k, axis, None)
        if bias is not None:
            layer.bias = bias
            layer.bias_node = add
            out = add.output[0]
    return _with_affine(layer, _pair_affine(index, store, out, k, axis, None, allow_bn=False))


def _with_affine(layer: Layer, affine: Affine | str | None) -> Layer | SkippedLayer:
    """The layer with its paired affine, or skipped with the reason pairing gave."""
    if isinstance(affine, str):
        return SkippedLayer(layer.key, layer.op, affine, layer.weight.tensor.name)
    layer.affine = affine
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
