"""An index of one ONNX graph: producers, consumers, and the constants behind node inputs.

Constants are resolved through initializers, ``Constant`` nodes and ``Identity`` chains. An initializer
that is also a graph input (IR version 3 requires every initializer to be one; torch's
``keep_initializers_as_inputs=True`` writes them so) is the model's stored weight: it is a constant here, marked
:attr:`ConstSource.graph_input`, because that is the value the model runs with unless a caller feeds another
(onnxruntime lets a caller do so from IR version 4). Uses are counted across the whole graph, subgraph bodies
(which can read outer-scope names) and graph outputs, so that an edit can tell whether a tensor is shared and
must be copied first.

Each node's arity and attribute types are read from its operator's schema *at the model's opset*
(:func:`model_opset`): Unsqueeze takes ``axes`` as an attribute before opset 13 and as an input from 13, and a
model valid at its own opset is never refused for lacking what a newer signature requires.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

import onnx
from onnx import NodeProto, TensorProto

from onnxclp.errors import OnnxclpError
from onnxclp.tensors import iter_graphs

# How deep the other inputs of a transform (a Reshape's shape, ...) may themselves be transformed constants.
MAX_NESTING = 8
# Nodes a constant may pass through on its way to a layer and still count as that layer's constant weight.
TRANSFORM_OPS = frozenset(
    {"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "DequantizeLinear", "QuantizeLinear"}
)
# Below this IR version every initializer must also be a graph input (ONNX IR, "Graphs"); from it they may not be.
INITIALIZER_INPUTS_OPTIONAL_IR = 4
_ONNX_DOMAINS = ("", "ai.onnx")


def model_opset(model: onnx.ModelProto, domain: str = "") -> int | None:
    """The version of ``domain`` (the default ONNX domain: ``""`` or its alias ``ai.onnx``) the model imports."""
    names = _ONNX_DOMAINS if domain in _ONNX_DOMAINS else (domain,)
    versions = [int(o.version) for o in model.opset_import if o.domain in names]
    return max(versions) if versions else None


def initializer_inputs(graph: onnx.GraphProto) -> list[str]:
    """Names of the graph's initializers that are also graph inputs, in initializer order."""
    inputs = {i.name for i in graph.input}
    return [t.name for t in graph.initializer if t.name in inputs]


@dataclass
class ConstSource:
    """Where a constant value lives: an initializer, or the ``value`` attribute of a Constant node."""

    tensor: TensorProto
    initializer: bool
    node: NodeProto | None = None  # the Constant node, when not an initializer
    via: list[NodeProto] = field(default_factory=list)  # transform nodes from the reader back to it
    graph_input: bool = False  # an initializer that is also a graph input (a runtime may let callers override it)

    @property
    def plain(self) -> bool:
        """Whether the reader sees the stored value as it is (nothing but Identity in between)."""
        return all(n.op_type == "Identity" for n in self.via)


def _subgraph_reads(node: NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (implicit inputs)."""
    reads: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in iter_graphs(g):
                defined = {i.name for i in sub.input} | {t.name for t in sub.initializer}
                for n in sub.node:
                    defined.update(n.output)
                for n in sub.node:
                    reads.update(x for x in n.input if x and x not in defined)
                reads.update(o.name for o in sub.output if o.name not in defined)
    return reads


class GraphIndex:
    """Producers, consumers and constants of a graph; validated on construction.

    ``opset`` is the model's default-domain opset (:func:`model_opset`): node checks read each operator's schema
    at that version (None: the newest schema onnx knows). ``ir_version`` is the model's IR version (None:
    unknown); below 4, an initializer an edit creates is declared a graph input too (:meth:`add_initializer`).
    :meth:`of` builds the index of a model's main graph with both. Raises :class:`OnnxclpError` when the graph
    reads a name nothing defines, defines a name twice, or has a cycle (nodes cannot be ordered).
    """

    def __init__(
        self,
        graph: onnx.GraphProto,
        outer: set[str] | None = None,
        *,
        opset: int | None = None,
        ir_version: int | None = None,
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.ir_version = ir_version
        self.initializers: dict[str, TensorProto] = {}
        for t in graph.initializer:
            if t.name in self.initializers:
                raise OnnxclpError(f"initializer {t.name!r} is defined twice")
            self.initializers[t.name] = t
        self.graph_inputs = {i.name for i in graph.input}
        if len(self.graph_inputs) != len(graph.input):
            dup = next(i.name for i in graph.input if sum(1 for j in graph.input if j.name == i.name) > 1)
            raise OnnxclpError(f"graph input {dup!r} is declared twice")
        _check_declared_shapes(graph)
        self.graph_outputs = {o.name for o in graph.output}
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        self.subgraph_reads: dict[str, int] = defaultdict(int)
        self.position: dict[int, int] = {}
        defined = set(self.initializers) | self.graph_inputs | (outer or set())
        pending: list[NodeProto] = []
        for pos, node in enumerate(graph.node):
            self.position[id(node)] = pos
            _check_node(node, opset)
            for out in node.output:
                if not out:
                    continue
                if out in self.producer or out in self.initializers or out in self.graph_inputs:
                    raise OnnxclpError(
                        f"tensor {out!r} is defined twice (by node {node.name!r} and another definition)"
                    )
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
            for name in _subgraph_reads(node):
                self.subgraph_reads[name] += 1
                self.consumers[name].append(node)
            pending.append(node)
        self._check_order(pending, defined)
        self._check_weights()

    @classmethod
    def of(cls, model: onnx.ModelProto) -> GraphIndex:
        """The index of the model's main graph, read at the model's opset and IR version."""
        return cls(model.graph, opset=model_opset(model), ir_version=int(model.ir_version) or None)

    @property
    def initializers_are_inputs(self) -> bool:
        """Whether every initializer must also be a graph input (IR version 3 and earlier)."""
        return self.ir_version is not None and self.ir_version < INITIALIZER_INPUTS_OPTIONAL_IR

    def add_initializer(self, tensor: TensorProto) -> TensorProto:
        """Append ``tensor`` to the graph's initializers (and, where the IR version requires it, to its inputs).

        Returns the stored tensor (the graph's copy). The index learns the name; nothing reads it yet.
        """
        self.graph.initializer.append(tensor)
        stored = self.graph.initializer[-1]
        self.initializers[stored.name] = stored
        if self.initializers_are_inputs and stored.name not in self.graph_inputs:
            dims = [int(d) for d in stored.dims]
            self.graph.input.append(onnx.helper.make_tensor_value_info(stored.name, stored.data_type, dims))
            self.graph_inputs.add(stored.name)
        return stored

    def _check_weights(self) -> None:
        """A Conv/ConvTranspose weight of rank < 3, a Gemm weight not 2-D, or an empty one: the model is invalid.

        Only weights stored as they are read (an initializer or Constant, through Identity at most) are
        checked here; layers.py skips, with a reason, the ones it cannot interpret.
        """
        for node in self.graph.node:
            rule = _WEIGHT_RANK.get(node.op_type, False)
            if rule is False or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            name = node.input[1]
            seen: set[str] = set()
            while name not in self.initializers and name not in seen and name in self.producer:
                producer = self.producer[name]
                # only the standard Identity (another domain's "Identity" is unchecked and may have no input)
                if producer.op_type != "Identity" or producer.domain not in ("", "ai.onnx") or not producer.input:
                    break
                seen.add(name)
                name = producer.input[0]
            tensor = self.initializers.get(name)
            producer = self.producer.get(name)
            if tensor is None and producer is not None and producer.op_type == "Constant":
                tensor = next((a.t for a in producer.attribute if a.name == "value" and a.type == a.TENSOR), None)
            if tensor is None:
                continue
            dims = list(tensor.dims)
            who = f"{node.op_type} node {self.node_key(node)!r}"
            if (rule is None and len(dims) < 3) or (rule is not None and len(dims) != rule):
                want = "rank >= 3" if rule is None else f"rank {rule}"
                raise OnnxclpError(f"{who}: weight {node.input[1]!r} has rank {len(dims)} (dims {dims}), not {want}")
            if 0 in dims:
                raise OnnxclpError(f"{who}: weight {node.input[1]!r} is empty (dims {dims})")
            if rule is None:
                _check_conv_attributes(node, who, len(dims) - 2)

    def _check_order(self, nodes: list[NodeProto], defined: set[str]) -> None:
        """Kahn's algorithm over data dependencies: finds reads of undefined names and cycles."""
        all_defined = defined | set(self.producer)
        for node in nodes:
            for name in node.input:
                if name and name not in all_defined:
                    raise OnnxclpError(f"node {node.name or node.op_type!r} reads {name!r}, which nothing defines")
        for out in self.graph_outputs:
            if out not in all_defined:
                raise OnnxclpError(f"graph output {out!r} is not produced by any node")
        waiting = {id(n): sum(1 for x in set(n.input) if x and x in self.producer) for n in nodes}
        ready = [n for n in nodes if waiting[id(n)] == 0]
        done = 0
        while ready:
            node = ready.pop()
            done += 1
            for out in node.output:
                for c in {id(c): c for c in self.consumers.get(out, []) if out in c.input}.values():
                    waiting[id(c)] -= 1
                    if waiting[id(c)] == 0:
                        ready.append(c)
        if done != len(nodes):
            raise OnnxclpError("the graph has a cycle: its nodes cannot be put in order")

    def node_key(self, node: NodeProto) -> str:
        """A stable identifier for a node: its name, or op type and position when it has none."""
        return node.name or f"{node.op_type}#{self.position[id(node)]}"

    def only_consumer(self, name: str) -> NodeProto | None:
        """The single node reading ``name``, if exactly one reads it once and it is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.graph_outputs:
            return None
        node = users[0]
        if list(node.input).count(name) != 1 or self.subgraph_reads.get(name):
            return None
        return node

    def constant(self, name: str, _depth: int = 0) -> ConstSource | None:
        """The constant behind a tensor name; None if it is not constant.

        Walks back through Identity and through the value-preserving transforms exporters put between a
        stored weight and its reader (:data:`TRANSFORM_OPS`: Transpose, Reshape, Squeeze, Unsqueeze, Cast,
        DequantizeLinear, and QuantizeLinear: a float weight fake-quantised by a QuantizeLinear -> DequantizeLinear
        pair, as quantisation-aware training exports it), provided their other inputs are constants too. ``via`` lists those nodes from the
        reader back to the stored constant. Those other inputs (a shape, axes, a scale) may themselves come
        through transforms, but at most :data:`MAX_NESTING` deep: a hostile graph nesting them thousands deep
        overflowed the stack, and reading a value doubles its work at each level that reuses one.
        Initializers that are also graph inputs count as constants (:attr:`ConstSource.graph_input` says so).
        """
        via: list[NodeProto] = []
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            if name in self.initializers:
                return ConstSource(self.initializers[name], True, None, via, name in self.graph_inputs)
            if name in self.graph_inputs:
                return None
            node = self.producer.get(name)
            if node is None:
                return None
            if node.op_type in TRANSFORM_OPS and node.domain in ("", "ai.onnx") and node.input and node.input[0]:
                if _depth >= MAX_NESTING or any(x and self.constant(x, _depth + 1) is None for x in node.input[1:]):
                    return None
                via.append(node)
                name = node.input[0]
                continue
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        return ConstSource(attr.t, False, node, via)
            return None
        return None

    def is_graph_input_initializer(self, name: str) -> bool:
        """Whether the name (through transform chains) is an initializer that is also a graph input."""
        seen: set[str] = set()
        while name not in seen:
            seen.add(name)
            if name in self.graph_inputs:
                return name in self.initializers
            node = self.producer.get(name)
            if node is None or node.op_type not in TRANSFORM_OPS or not node.input:
                return False
            name = node.input[0]
        return False

    def uses(self, src: ConstSource) -> int:
        """How many node inputs, subgraph reads and graph outputs see this constant's value."""
        root = src.tensor.name if src.initializer else src.node.output[0]
        count = 0
        stack = [root]
        while stack:
            name = stack.pop()
            if name in self.graph_outputs:
                count += 1
            for user in self.consumers.get(name, []):
                if user.op_type == "Identity" and user.domain in ("", "ai.onnx") and name in user.input:
                    stack.append(user.output[0])
                else:
                    count += max(1, list(user.input).count(name))
        return count


# Standard ops whose inputs and attributes onnxclp reads: they are checked against their ONNX schema.
_CHECKED_OPS = frozenset(
    {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Mul", "Add", "Sum", "Dropout", "Identity"}
    | {"Constant"}
    | set(TRANSFORM_OPS)
)
# The weight input of the scored ops, and the rank their weight must have (None: any rank >= 3).
_WEIGHT_RANK = {"Conv": None, "ConvTranspose": None, "Gemm": 2}


@lru_cache(maxsize=512)
def schema_at(op_type: str, opset: int | None) -> onnx.defs.OpSchema | None:
    """The default domain's schema of ``op_type`` in force at ``opset`` (None: the newest onnx knows).

    None when onnx knows no such operator at that opset (onnx's checker refuses such a node first).
    """
    try:
        if opset is None:
            return onnx.defs.get_schema(op_type, domain="")
        return onnx.defs.get_schema(op_type, max_inclusive_version=int(opset), domain="")
    except onnx.defs.SchemaError:
        return None


def _check_node(node: NodeProto, opset: int | None = None) -> None:
    """A node of an op onnxclp reads has its required inputs and outputs, and attributes of the right type.

    The rules are those of the operator's schema at ``opset`` (the model's), not its newest signature: before
    opset 13 Unsqueeze has one input and ``axes`` is an attribute. Ops of other domains, and standard ops onnxclp
    does not read, are not checked: they pass through.
    """
    if node.op_type not in _CHECKED_OPS or node.domain not in _ONNX_DOMAINS:
        return
    schema = schema_at(node.op_type, opset)
    if schema is None:
        return
    who = f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
    at = f" at opset {opset}" if opset is not None else ""
    if len(node.input) < schema.min_input or not all(node.input[: schema.min_input]):
        raise OnnxclpError(f"{who} lacks a required input (it needs {schema.min_input}{at})")
    if len(node.output) < schema.min_output or not all(node.output[: schema.min_output]):
        raise OnnxclpError(f"{who} lacks a required output")
    for a in node.attribute:
        spec = schema.attributes.get(a.name)
        if spec is not None and int(a.type) != int(spec.type):
            have = onnx.AttributeProto.AttributeType.Name(a.type)
            want = onnx.AttributeProto.AttributeType.Name(int(spec.type))
            raise OnnxclpError(f"{who}: attribute {a.name!r} is {have}, the ONNX spec{at} says {want}")


def _check_declared_shapes(graph: onnx.GraphProto) -> None:
    """Declared tensor shapes (inputs, outputs, value_info) with a negative or impossibly large size."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        numel = 1
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                if d.dim_value < 0:
                    raise OnnxclpError(f"tensor {vi.name!r} is declared with a negative dimension {d.dim_value}")
                numel *= d.dim_value
        if numel > 2**63 - 1:
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]
            raise OnnxclpError(f"tensor {vi.name!r} is declared with {numel} elements (dims {dims})")


def _check_conv_attributes(node: NodeProto, who: str, nd: int) -> None:
    """strides, dilations, pads, kernel_shape and group of a convolution with an ``nd``-D kernel."""
    values = {a.name: list(a.ints) if a.type == a.INTS else a.i for a in node.attribute}
    for name, length, low in (("strides", nd, 1), ("dilations", nd, 1), ("pads", 2 * nd, 0)):
        v = values.get(name)
        if v is not None and (len(v) != length or min(v, default=low) < low):
            raise OnnxclpError(f"{who}: {name} {v[:8]} do not fit a {nd}-D kernel")
    if values.get("group", 1) < 1:
        raise OnnxclpError(f"{who}: group {values['group']} is not positive")
