"""Model-level validity checks run by the safe loader (issue 15, point 6): malformed models are refused.

A model that onnx's checker rejects, or whose layers contradict their own weights, must not be written out as
"sanitized". :func:`check_model` runs, in this order:

1. opset imports: an ONNX domain's opset no newer than the installed onnx knows (:func:`check_opsets`);
2. model-local functions: IR version 8 or later, and no function that calls itself, directly or through
   others (checked here too, so an onnx without the checker's cycle check still refuses them);
3. onnx's checker (``full_check=False``: no shape inference) on a *skeleton* of the model: the same model with
   every large or external tensor replaced by an empty stub of the same name and type. The checker then sees
   the whole structure (IR version, opset imports, node schemas and attributes, SSA form and order, functions)
   but neither serializes the weights (a 45 MB ResNet-18: 0.3 ms instead of 100 ms) nor resolves external-data
   paths itself (it would resolve them against the working directory, and a model with more than 2 GiB of
   weights could not be serialized). The tensors left out were checked already by :class:`onnxclp.io.TensorStore`
   (type, dims, exactly the bytes the dims need, safe external-data entries). One checker rule is relaxed: a
   graph input or output without a shape (unknown rank, which the IR allows: onnx/onnx#2932);
4. channel counts the layer structure fixes: a Conv's ``group`` divides its weight's output channels and
   ``weight.shape[1] * group`` equals the channels of its input; a ConvTranspose's ``group`` divides its
   weight's input channels, which equal those of its input; a BatchNormalization's scale, bias, mean and
   variance have one value per channel of its input. Channel counts come from the layer that produced the
   input (through ops that keep the channel count) or from a graph input's static shape; where neither is known,
   nothing is assumed.

Every failure raises :class:`onnxclp.errors.OnnxclpError` (exit 2) with one line naming the problem. Every rule
holds at every opset (a Conv's ``group`` and a BatchNormalization's inputs have not changed; ``spatial=0`` before
opset 9 is recognised); the node arity checks of :class:`onnxclp.graph.GraphIndex` read each operator's schema at
the model's opset, so a model onnx's checker accepts is not refused for an older signature.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto

from onnxclp.errors import OnnxclpError
from onnxclp.graph import GraphIndex
from onnxclp.tensors import iter_graphs, iter_tensors

# Tensors whose serialized size exceeds this are stubbed in the skeleton handed to onnx's checker.
STUB_BYTES = 4096
# Longest checker message kept in the one-line error.
_MAX_MESSAGE = 240
_ONNX_DOMAINS = ("", "ai.onnx")
# Model-local functions appeared in IR version 8.
_FUNCTIONS_IR = 8

# Standard ops whose output has the shape of their first input (so the channel count of axis 1 too).
SHAPE_PRESERVING = frozenset(
    [
        "Abs",
        "BatchNormalization",
        "Cast",
        "CastLike",
        "Ceil",
        "Celu",
        "Clip",
        "DequantizeLinear",
        "Dropout",
        "Elu",
        "Erf",
        "Exp",
        "Floor",
        "Gelu",
        "HardSigmoid",
        "HardSwish",
        "Hardmax",
        "Identity",
        "InstanceNormalization",
        "LeakyRelu",
        "Log",
        "LogSoftmax",
        "LpNormalization",
        "LRN",
        "MeanVarianceNormalization",
        "Mish",
        "Neg",
        "PRelu",
        "QuantizeLinear",
        "Reciprocal",
        "Relu",
        "Round",
        "Selu",
        "Sigmoid",
        "Sign",
        "Softmax",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Swish",
        "Tanh",
        "ThresholdedRelu",
    ]
)
# Standard ops that keep axes 0 and 1 (batch and channels) of their first input and change the rest.
CHANNEL_PRESERVING = SHAPE_PRESERVING | {
    "AveragePool",
    "GlobalAveragePool",
    "GlobalLpPool",
    "GlobalMaxPool",
    "LpPool",
    "MaxPool",
}


def check_model(model: ModelProto, where: str = "model") -> None:
    """Refuse a model onnx's checker rejects or whose layers contradict their weights' shapes.

    ``where`` (the file name) starts the error message. The model must have passed
    :class:`onnxclp.io.TensorStore`'s tensor checks first: tensors stubbed for the checker are not looked at
    again. Raises :class:`OnnxclpError`.
    """
    check_opsets(model, where)
    check_functions(model, where)
    run_checker(model, where)
    check_channels(model.graph)


def _known_opsets() -> dict[str, int]:
    """The newest opset of each ONNX domain the installed onnx has schemas for."""
    newest = onnx.defs.onnx_opset_version()
    return {"": newest, "ai.onnx": newest, "ai.onnx.ml": onnx.defs.onnx_ml_opset_version()}


def check_opsets(model: ModelProto, where: str = "model") -> None:
    """Refuse an ONNX-domain opset newer than the installed onnx knows.

    onnx's checker accepts such a model silently, and every operator would then be read with the newest schema
    this onnx has, which may not be the model's: onnxclp cannot tell what its nodes mean. Custom domains are
    not onnx's to know and are left alone.
    """
    known = _known_opsets()
    for o in model.opset_import:
        newest = known.get(o.domain)
        if newest is not None and int(o.version) > newest:
            domain = o.domain or "ai.onnx"
            raise OnnxclpError(
                f"{where}: opset {domain} {o.version} is newer than the installed onnx {onnx.__version__} knows "
                f"(up to {newest}); upgrade onnx (pip install -U onnx)"
            )


# ---------------------------------------------------------------------------------------------------------------
# Model-local functions
# ---------------------------------------------------------------------------------------------------------------


def _calls(nodes: Iterator[NodeProto] | list[NodeProto]) -> Iterator[NodeProto]:
    """The nodes, and every node of the subgraphs in their attributes."""
    for node in nodes:
        yield node
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                for g in iter_graphs(a.g):
                    yield from g.node
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    for g in iter_graphs(sub):
                        yield from g.node


def check_functions(model: ModelProto, where: str = "model") -> None:
    """Model-local functions need IR version >= 8, and none may call itself, directly or through others."""
    if not model.functions:
        return
    if model.ir_version < _FUNCTIONS_IR:
        raise OnnxclpError(
            f"{where}: has model-local functions but IR version {model.ir_version} "
            f"(functions need IR version {_FUNCTIONS_IR} or later)"
        )
    ids = {(f.domain, f.name, f.overload): f for f in model.functions}
    callees = {
        key: sorted({k for n in _calls(f.node) if (k := (n.domain, n.op_type, n.overload)) in ids})
        for key, f in ids.items()
    }
    # Iterative depth-first search, three colours: 0 unseen, 1 on the current path, 2 done.
    colour = dict.fromkeys(ids, 0)
    for start in ids:
        if colour[start]:
            continue
        path = [start]
        stack = [iter(callees[start])]
        colour[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = 2
                stack.pop()
            elif colour[nxt] == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                names = " -> ".join(f"{d}.{n}" if d else n for d, n, _ in cycle)
                raise OnnxclpError(f"{where}: model-local functions are recursive ({names}); ONNX forbids recursion")
            elif colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append(iter(callees[nxt]))


# ---------------------------------------------------------------------------------------------------------------
# onnx's checker, on a skeleton of the model
# ---------------------------------------------------------------------------------------------------------------


def _repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have label
    return bool(rep) if rep is not None else field.label == field.LABEL_REPEATED


def _copy_fields(dst, src, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst``, except the one named ``skip``."""
    for f, value in src.ListFields():
        if f.name == skip:
            continue
        if _repeated(f):
            getattr(dst, f.name).extend(value)
        elif f.type == f.TYPE_MESSAGE:
            getattr(dst, f.name).CopyFrom(value)
        else:
            setattr(dst, f.name, value)


def _needs_stub(t: TensorProto) -> bool:
    """External, or (by its dims, at up to 8 bytes an element) over ``STUB_BYTES``.

    Sizes come from the dims: protobuf's ByteSize() costs 11 ms over a ResNet-18's initializers. The data
    matches the dims (TensorStore checked it), except for strings, whose elements have no fixed size.
    """
    if t.data_location == TensorProto.EXTERNAL:
        return True
    if t.data_type == TensorProto.STRING:
        return t.ByteSize() > STUB_BYTES
    n = 1
    for d in t.dims:
        n *= max(int(d), 0)
    return n * 8 > STUB_BYTES


def _stub(t: TensorProto) -> None:
    """Empty the tensor in place: same name and type, dims [0], no data (valid for the checker)."""
    name, data_type = t.name, t.data_type
    t.Clear()
    t.name, t.data_type = name, data_type
    t.dims.append(0)


def skeleton(model: ModelProto) -> ModelProto:
    """A copy of ``model`` with every external tensor, and every tensor over ``STUB_BYTES``, stubbed.

    The main graph's large initializers are never copied (only their name and type); tensors elsewhere
    (subgraphs, Constant nodes, functions) are copied, then stubbed. A sparse tensor's values and indices
    are stubbed together, so the stub stays consistent.
    """
    skel = ModelProto()
    _copy_fields(skel, model, "graph")
    graph = skel.graph
    _copy_fields(graph, model.graph, "initializer")
    for t in model.graph.initializer:
        s = graph.initializer.add()
        if _needs_stub(t):
            s.name, s.data_type = t.name, t.data_type
            s.dims.append(0)
        else:
            s.CopyFrom(t)
    # ONNX's IR lets a graph input or output omit its shape (unknown rank), and onnxruntime accepts that; the
    # checker requires the field (onnx/onnx#2932). The skeleton gets an empty one so only that rule is relaxed.
    for vi in list(graph.input) + list(graph.output):
        for kind in ("tensor_type", "sparse_tensor_type"):
            if vi.type.HasField(kind) and not getattr(vi.type, kind).HasField("shape"):
                getattr(vi.type, kind).shape.SetInParent()
    graphs: list[GraphProto] = list(iter_graphs(graph))
    for g in graphs:
        for sp in g.sparse_initializer:
            if _needs_stub(sp.values) or _needs_stub(sp.indices):
                _stub(sp.values)
                _stub(sp.indices)
    for t in iter_tensors(skel):
        if _needs_stub(t):
            _stub(t)
    return skel


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " ".join(line.replace("==> Context:", "in") for line in lines)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def run_checker(model: ModelProto, where: str = "model") -> None:
    """``onnx.checker.check_model(full_check=False)`` on :func:`skeleton` of the model.

    When the checker refuses a graph that onnxclp's own graph checks also refuse (a cycle, a name nothing
    defines, a name defined twice), onnxclp's more specific message is the one raised.
    """
    data = skeleton(model).SerializePartialToString()  # a failure here is onnxclp's, not the model's
    try:
        onnx.checker.check_model(data, full_check=False)
    except Exception as exc:  # ValidationError, SchemaError, or anything else the checker raises: fail closed
        GraphIndex.of(model)  # raises its own message when it sees the problem too
        raise OnnxclpError(
            f"{where}: not a valid ONNX model (onnx {onnx.__version__} checker: {_one_line(str(exc))})"
        ) from exc


# ---------------------------------------------------------------------------------------------------------------
# Channel counts: Conv group, ConvTranspose group, BatchNormalization parameters
# ---------------------------------------------------------------------------------------------------------------


def _int_attr(node: NodeProto, name: str, default: int) -> int | None:
    """An INT attribute's value, ``default`` when absent, None when it has another type (checked elsewhere)."""
    for a in node.attribute:
        if a.name == name:
            return int(a.i) if a.type == AttributeProto.INT else None
    return default


def _who(node: NodeProto, pos: int) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node #{pos}"


class _Shapes:
    """Static facts about tensors of one graph, found without shape inference and cached."""

    def __init__(self, graph: GraphProto) -> None:
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, NodeProto] = {}
        for node in graph.node:
            for out in node.output:
                if out:
                    self.producer.setdefault(out, node)
        # Channel counts declared by graph inputs (onnxruntime refuses a feed of another shape). value_info is
        # only a hint that runtimes override, so it is not used.
        self.declared: dict[str, int] = {}
        for vi in (i for i in graph.input if i.name not in self.initializers):
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tt is not None and tt.HasField("shape") and len(tt.shape.dim) >= 2:
                d = tt.shape.dim[1]
                if d.HasField("dim_value") and d.dim_value > 0:
                    self.declared.setdefault(vi.name, int(d.dim_value))

    def _follow(self, name: str, ops: frozenset[str]) -> tuple[str, NodeProto | None]:
        """Walk back from ``name`` through producers in ``ops`` (first input); the name reached and its producer."""
        seen: set[str] = set()
        node = self.producer.get(name)
        while (
            node is not None
            and node.op_type in ops
            and node.domain in _ONNX_DOMAINS
            and node.input
            and node.input[0]
            and name not in seen
        ):
            seen.add(name)
            name = node.input[0]
            node = self.producer.get(name)
        return name, node

    def weight_dims(self, name: str) -> list[int] | None:
        """Dims of a constant (an initializer or Constant node, through shape-preserving ops), or None."""
        name, node = self._follow(name, SHAPE_PRESERVING)
        tensor = self.initializers.get(name)
        if tensor is None and node is not None and node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
            tensor = next((a.t for a in node.attribute if a.name == "value" and a.type == AttributeProto.TENSOR), None)
        return None if tensor is None else [int(d) for d in tensor.dims]

    def channels(self, name: str) -> tuple[int, str] | None:
        """Channel count (axis 1) of tensor ``name`` and where it comes from, when statically known."""
        name, node = self._follow(name, CHANNEL_PRESERVING)
        if name in self.declared:
            return self.declared[name], f"graph input {name!r} is declared so"
        if node is None or node.domain not in _ONNX_DOMAINS or len(node.input) < 2:
            return None
        dims = self.weight_dims(node.input[1])
        group = _int_attr(node, "group", 1)
        if dims is None or not dims or group is None:
            return None
        k: int | None = None
        if node.op_type == "Conv" and len(dims) >= 3:
            k = dims[0]
        elif node.op_type == "ConvTranspose" and len(dims) >= 3:
            k = dims[1] * group
        elif node.op_type == "Gemm" and len(dims) == 2:
            k = dims[0] if _int_attr(node, "transB", 0) else dims[1]
        if k is None:
            return None
        label = f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
        return k, f"the output of {label}"


def _numel(dims: list[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def check_channels(graph: GraphProto) -> None:
    """Conv/ConvTranspose ``group`` against the weight and the input; BatchNormalization parameter lengths.

    Only facts known without shape inference are compared: weights stored as constants (through Identity,
    Cast, DequantizeLinear and the like) and channel counts from the producing layer or a graph input's shape.
    """
    shapes = _Shapes(graph)
    for pos, node in enumerate(graph.node):
        if node.domain not in _ONNX_DOMAINS:
            continue
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) >= 2:
            _check_conv(shapes, node, pos)
        elif node.op_type == "BatchNormalization" and len(node.input) >= 5:
            _check_batchnorm(shapes, node, pos)


def _check_conv(shapes: _Shapes, node: NodeProto, pos: int) -> None:
    dims = shapes.weight_dims(node.input[1])
    group = _int_attr(node, "group", 1)
    if dims is None or len(dims) < 3 or group is None or group < 1:
        return  # not a constant weight, or a rank or group graph.py refuses with its own message
    who = _who(node, pos)
    transpose = node.op_type == "ConvTranspose"
    # Conv: weight (M, C/group, k...); ConvTranspose: weight (C, M/group, k...).
    split = dims[0]
    if split % group:
        what = "input" if transpose else "output"
        raise OnnxclpError(f"{who}: group {group} does not divide the weight's {split} {what} channels (dims {dims})")
    want = dims[0] if transpose else dims[1] * group
    found = shapes.channels(node.input[0]) if node.input[0] else None
    if found is not None and found[0] != want:
        how = f"weight dims {dims}" + ("" if transpose else f" with group {group}")
        raise OnnxclpError(f"{who}: its input has {found[0]} channels ({found[1]}), but {how} takes {want}")


def _check_batchnorm(shapes: _Shapes, node: NodeProto, pos: int) -> None:
    spatial = _int_attr(node, "spatial", 1)
    if spatial != 1:
        return  # opset < 9, spatial=0: one value per activation, not per channel
    sizes = {}
    for i, part in zip(range(1, 5), ("scale", "B", "mean", "var"), strict=True):
        dims = shapes.weight_dims(node.input[i]) if node.input[i] else None
        if dims is not None:
            sizes[part] = _numel(dims)
    who = _who(node, pos)
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in sizes.items())
        raise OnnxclpError(f"{who}: its parameters differ in length ({listed} values)")
    found = shapes.channels(node.input[0]) if node.input[0] else None
    if found is not None and sizes:
        part, n = next(iter(sizes.items()))
        if n != found[0]:
            raise OnnxclpError(
                f"{who}: {part} has {n} values but its input has {found[0]} channels ({found[1]}); "
                "BatchNormalization needs one per channel"
            )
