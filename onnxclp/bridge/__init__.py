"""ONNX -> PyTorch bridge: run an ONNX classifier as a ``torch.nn.Module`` whose weights are parameters.

The data-free methods that optimise inputs or unlearn weights (MM-BD, OTBR; docs/bridge.md) need gradients
through the model. onnx2torch cannot be used on the project's machines: it imports torchvision, whose build
from the package registry does not load against the CPU-only torch (``operator torchvision::nms does not
exist``). This package is a small executor instead: :func:`to_torch` checks every node against the operators
of :mod:`onnxclp.bridge.ops` (raising :class:`UnsupportedOp`, naming every unsupported op and node, before
anything runs) and returns an :class:`OnnxModule` that runs the graph node by node in topological order.

Every floating-point initializer becomes an ``nn.Parameter`` (:meth:`OnnxModule.param_for`), except those
read as statistics or numbers (BatchNormalization's running mean and variance, Upsample/Resize scales,
Dropout's ratio), which are float buffers (:meth:`OnnxModule.buffer_for`); integer initializers and Constant
nodes are buffers too. :meth:`OnnxModule.state_to_onnx` gives the current values per initializer name, in
each initializer's own dtype, for the caller to write back through onnxclp's editor; the ONNX file itself is
never touched here. A graph exported with a fixed batch runs at any batch (the fixed-batch rule of
docs/bridge.md); taps (:meth:`OnnxModule.set_tap`) insert modules after any computed tensor; an op that fails
while running is an :class:`~onnxclp.errors.OnnxclpError` with exit code 3 naming the node. Tensor values are read through
:class:`onnxclp.io.TensorStore`, so external data goes through the same safety checks as everywhere else.

Half precision: a float16 or bfloat16 graph (``model.half()`` exports, float16 conversions) is computed in float32.
Its float16/bfloat16 initializers and constants become float32 tensors, a ``Cast`` to either type gives float32, and
the caller feeds float32 inputs; :meth:`OnnxModule.state_to_onnx` writes values back in each initializer's own dtype
(a value past float16's range comes back as inf for the writer to refuse). Training and optimising inputs in float16
on a CPU is neither supported by every torch kernel nor stable, and onnxruntime's answers, which the guard measures,
stay those of the file.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from onnxclp.bridge.ops import OPS, unsupported_reason
from onnxclp.errors import EXIT_NOTHING, OnnxclpError
from onnxclp.io import TensorStore, load_model

__all__ = ["OnnxModule", "UnsupportedOp", "input_spec", "load", "to_torch"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


class UnsupportedOp(OnnxclpError):
    """The model uses operators (or operator attributes) the bridge cannot run; exit code 3.

    ``ops`` maps each unsupported op type (``domain.Op`` outside the default domain, or ``Op (reason)``) to
    the names of the nodes that use it.
    """

    def __init__(self, ops: dict[str, list[str]]) -> None:
        self.ops = dict(ops)
        parts = []
        for op_type in sorted(ops):
            nodes = ops[op_type]
            shown = ", ".join(repr(n) for n in nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
            parts.append(f"{op_type} (node {shown})" if len(nodes) == 1 else f"{op_type} (nodes {shown})")
        super().__init__("the torch bridge does not support " + "; ".join(parts), EXIT_NOTHING)


def _node_label(node: onnx.NodeProto, i: int) -> str:
    return node.name or (f"{node.op_type}#{i} -> {node.output[0]}" if node.output else f"{node.op_type}#{i}")


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return 1


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one: a scalar Gather index must stay 0-d)
    if arr.dtype.name == "bfloat16" or arr.dtype == np.float16:  # computed in float32 (module docstring)
        return torch.from_numpy(arr.astype(np.float32, order="C"))
    if arr.dtype in (np.uint16, np.uint32, np.uint64):
        arr = arr.astype(np.int64)
    if not arr.flags.c_contiguous or not arr.flags.writeable or not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="), order="C", copy=True)
    return torch.from_numpy(arr)


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"


def _attrs(node: onnx.NodeProto, store: TensorStore) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            out[attr.name] = _to_tensor(store.read(attr.t))
        elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[attr.name] = None  # ops with subgraphs are unsupported; never read
        else:
            v = onnx.helper.get_attribute_value(attr)
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            elif isinstance(v, list):
                v = [s.decode("utf-8", "replace") if isinstance(s, bytes) else s for s in v]
            out[attr.name] = v
    out["_op"] = node.op_type
    out["_n_outputs"] = len(node.output)
    return out


def _constant_value(node: onnx.NodeProto, store: TensorStore) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return store.read(attr.t)
    if attr.name == "value_float":
        return np.array(attr.f, dtype=np.float32)
    if attr.name == "value_floats":
        return np.array(list(attr.floats), dtype=np.float32)
    if attr.name == "value_int":
        return np.array(attr.i, dtype=np.int64)
    if attr.name == "value_ints":
        return np.array(list(attr.ints), dtype=np.int64)
    raise AssertionError(attr.name)  # refused by _check


def _check(graph: onnx.GraphProto, opset: int) -> None:
    """Raise UnsupportedOp listing every node the executor cannot run."""
    bad: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        label = _node_label(node, i)
        if node.domain not in _DEFAULT_DOMAINS:
            bad[f"{node.domain}.{node.op_type}"].append(label)
        elif node.op_type not in OPS:
            bad[node.op_type].append(label)
        elif node.op_type == "Constant":
            if len(node.attribute) != 1 or node.attribute[0].name not in (
                "value",
                "value_float",
                "value_floats",
                "value_int",
                "value_ints",
            ):
                bad["Constant (sparse or string value)"].append(label)
        else:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            attrs = {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v for k, v in attrs.items()}
            reason = unsupported_reason(node.op_type, attrs, len([o for o in node.output if o]), opset)
            if reason:
                bad[f"{node.op_type} ({reason})"].append(label)
    if graph.sparse_initializer:
        bad["sparse_initializer"].extend(t.values.name for t in graph.sparse_initializer)
    if bad:
        raise UnsupportedOp(bad)


# Float inputs that a node reads as statistics or numbers, never as weights to train: (op type -> input
# positions). BatchNormalization's running mean and variance (inputs 3 and 4: F.batch_norm cannot
# differentiate with respect to them), Upsample's/Resize's roi and scales, Dropout's ratio.
_BUFFER_INPUTS: dict[str, tuple[int, ...]] = {
    "BatchNormalization": (3, 4),
    "Upsample": (1,),
    "Resize": (1, 2),
    "Dropout": (1,),
    # quantisation parameters: a repair trains the network, not its quantisation grid
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
}

# Ops whose constant shape-like input (position) gives the output's dimension 0: the fixed-batch rule.
_BATCH_SHAPE_INPUT: dict[str, int] = {"Reshape": 1, "Expand": 1, "Tile": 1, "ConstantOfShape": 0}


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (once per input slot)."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for x in n.input:
            readers[x].append(n)
    return readers


def _weight_dequantizers(
    graph: onnx.GraphProto, arrays: dict[str, np.ndarray], readers: dict[str, list[onnx.NodeProto]]
) -> list[onnx.NodeProto]:
    """The DequantizeLinear nodes that dequantize a weight: integer initializer, float scale and (if any) integer
    zero point all initializers, the integer one read by this node alone, per-tensor or per-axis (not blocked),
    neither tensor a graph output."""
    outputs = {o.name for o in graph.output}
    found = []
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.domain not in _DEFAULT_DOMAINS or len(n.input) < 2:
            continue
        q, scale = arrays.get(n.input[0]), arrays.get(n.input[1])
        zp = arrays.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if q is None or scale is None or (len(n.input) > 2 and n.input[2] and zp is None):
            continue
        if q.dtype.kind not in "iu" or q.dtype.itemsize > 4 or not _is_float(scale):
            continue
        if zp is not None and zp.dtype != q.dtype:
            continue
        if any(a.name == "block_size" and a.i for a in n.attribute):
            continue
        if len(readers.get(n.input[0], ())) != 1 or n.input[0] in outputs or n.output[0] in outputs:
            continue
        found.append(n)
    return found


def _activation_pairs(
    graph: onnx.GraphProto, constants: set[str], readers: dict[str, list[onnx.NodeProto]]
) -> list[list[onnx.NodeProto]]:
    """Each QuantizeLinear of a computed tensor whose every reader is a DequantizeLinear on the same scale and zero
    point (a fake-quantised activation of a QDQ graph), with those readers: ``[quantize, dequantize, ...]``."""
    outputs = {o.name for o in graph.output}
    pairs = []
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or n.domain not in _DEFAULT_DOMAINS or n.input[0] in constants:
            continue
        users = readers.get(n.output[0], [])
        same = [u for u in users if u.op_type == "DequantizeLinear" and u.domain in _DEFAULT_DOMAINS
                and list(u.input[1:]) == list(n.input[1:]) and list(u.input).count(n.output[0]) == 1
                and u.input[0] == n.output[0]]  # fmt: skip
        if users and len(same) == len(users) and n.output[0] not in outputs:
            pairs.append([n, *same])
    return pairs


def _with_inputs(node: onnx.NodeProto, renamed: dict[str, str]) -> onnx.NodeProto:
    """A copy of ``node`` reading ``renamed[x]`` wherever it read ``x`` (followed to the end of a chain)."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for i, x in enumerate(out.input):
        seen = 0
        while x in renamed and seen < len(renamed):
            x, seen = renamed[x], seen + 1
        out.input[i] = x
    return out


def _declared_batch(model: onnx.ModelProto, name: str) -> int | None:
    """The fixed dimension 0 the graph input ``name`` declares (None: symbolic, unknown or rank 0)."""
    for vi in model.graph.input:
        if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def _rebatched(
    op_type: str, shape: torch.Tensor, data: torch.Tensor | None, b0: int, b: int, from_input: bool
) -> torch.Tensor | None:
    """The fixed-batch rule for one node: its shape with the first entry ``b0`` replaced by ``b``, or None.

    ``shape`` is the node's constant target shape (Reshape, Expand, ConstantOfShape) or repeats (Tile), of
    at least two entries; ``b0`` the batch the graph input declares and ``b`` the batch forward was given.
    The first entry is read as the batch when it equals ``b0`` and, per op:

    - Reshape: the data input comes from the graph input (``from_input``) and its dimension 0 is ``b``;
    - Expand: the data input's dimension aligned with the target's first is new, 1 or ``b``;
    - Tile: the data input's dimension 0 is 1 (the output's dimension 0 is then the repeat count);
    - ConstantOfShape: always.
    """
    if shape.dim() != 1 or shape.numel() < 2 or int(shape[0]) != b0:
        return None
    if op_type == "Reshape":
        ok = from_input and data is not None and data.dim() > 0 and data.shape[0] == b
    elif op_type == "Expand":
        ok = data is not None and (shape.numel() > data.dim() or data.shape[0] in (1, b))
    elif op_type == "Tile":
        ok = data is not None and data.dim() > 0 and data.shape[0] == 1
    else:
        ok = op_type == "ConstantOfShape"
    if not ok:
        return None
    out = shape.clone()
    out[0] = b
    return out


def _topological(nodes: list[onnx.NodeProto], known: set[str]) -> list[onnx.NodeProto]:
    producers = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producers[x] for x in n.input if x and x not in known and x in producers} for n in nodes]
    for i, n in enumerate(nodes):
        for x in n.input:
            if x and x not in known and x not in producers:
                raise OnnxclpError(f"node {_node_label(n, i)!r} reads {x!r}, which nothing defines")
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise OnnxclpError("the graph has a cycle: its nodes cannot be ordered")
    return [nodes[i] for i in order]


class OnnxModule(nn.Module):
    """An ONNX graph run by torch, node by node; float initializers are trainable parameters.

    Build it with :func:`to_torch`. ``forward(*inputs)`` takes the graph's inputs (those that are not
    initializers) in declaration order and returns the single output, or a tuple of outputs.
    """

    def __init__(
        self, model: onnx.ModelProto, store: TensorStore, logits: bool = False, float_activations: bool = False
    ) -> None:
        super().__init__()
        graph = model.graph
        self.opset = _default_opset(model)
        _check(graph, self.opset)
        self.params = nn.ParameterDict()
        self.float_buffers = nn.Module()
        self.consts = nn.Module()
        self.taps = nn.ModuleDict()
        self._param_key: dict[str, str] = {}  # initializer name -> key in self.params
        self._buffer_key: dict[str, str] = {}  # float initializer read as statistic -> buffer in self.float_buffers
        self._const_key: dict[str, str] = {}  # tensor name -> buffer name in self.consts
        self._tap_key: dict[str, str] = {}  # tapped tensor name -> key in self.taps
        self._dtype: dict[str, np.dtype] = {}  # initializer name -> its numpy dtype in the file
        self._used_keys: set[str] = set()
        key_for = self._new_key

        as_buffer = {
            n.input[i]
            for n in graph.node
            if n.domain in _DEFAULT_DOMAINS
            for i in _BUFFER_INPUTS.get(n.op_type, ())
            if i < len(n.input) and n.input[i]
        }
        inits = {t.name: t for t in graph.initializer}
        arrays = {t.name: store.read(t) for t in graph.initializer}
        file_dtype = {name: arr.dtype for name, arr in arrays.items()}
        # QDQ weights (docs/bridge.md, "Quantized weights"): the integer initializer of a weight's
        # DequantizeLinear becomes a float parameter holding the dequantized value; the node is dropped.
        self._quantized: dict[str, tuple[torch.Tensor, torch.Tensor | None, int]] = {}  # name -> scale, zp, axis
        self.quantization_clipped: dict[str, int] = {}  # name -> values clipped when last written back
        renamed: dict[str, str] = {}  # the dropped DequantizeLinear's output -> the integer initializer's name
        readers = _readers(graph)
        for node in _weight_dequantizers(graph, arrays, readers):
            q, scale, zp = (arrays[n] if n else None for n in [*node.input, ""][:3])
            assert q is not None and scale is not None
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            args = [_to_tensor(q), _to_tensor(scale)] + ([] if zp is None else [_to_tensor(zp)])
            value = OPS["DequantizeLinear"](args, attrs, self.opset)
            assert isinstance(value, torch.Tensor)
            axis = int(attrs.get("axis", 1))
            axis = axis + q.ndim if axis < 0 else axis
            self._quantized[node.input[0]] = (args[1], args[2] if zp is not None else None, axis)
            renamed[node.output[0]] = node.input[0]
            arrays[node.input[0]] = value.numpy()  # trained as a float parameter, written back as integers
        dropped = set(renamed)  # the first output of each node left out of the plan
        identity: dict[str, onnx.NodeProto] = {}  # a DequantizeLinear's output -> the float op run in its place
        if float_activations:  # each activation's QuantizeLinear -> DequantizeLinear pair read as floats
            for pair in _activation_pairs(graph, set(arrays), readers):
                quantize = pair[0]
                dropped.add(quantize.output[0])
                zp = arrays.get(quantize.input[2]) if len(quantize.input) > 2 and quantize.input[2] else None
                # a range that starts at 0 is a ReLU the quantizer folded into it (no zero point: uint8, from 0)
                relu = zp is None or (zp.dtype.kind in "iu" and bool(np.all(zp == np.iinfo(zp.dtype).min)))
                for dq in pair[1:]:
                    identity[dq.output[0]] = onnx.helper.make_node("Relu" if relu else "Identity", [quantize.input[0]],
                                                             [dq.output[0]])  # fmt: skip
        for t in graph.initializer:
            arr = arrays[t.name]
            self._dtype[t.name] = file_dtype[t.name]
            if _is_float(arr) and t.name not in as_buffer:
                key = key_for(t.name, "p_")
                self.params[key] = nn.Parameter(_to_tensor(arr))
                self._param_key[t.name] = key
            elif _is_float(arr):
                key = key_for(t.name, "b_")
                self.float_buffers.register_buffer(key, _to_tensor(arr))
                self._buffer_key[t.name] = key
            else:
                key = key_for(t.name, "c_")
                self.consts.register_buffer(key, _to_tensor(arr))
                self._const_key[t.name] = key
        self.initializer_names: list[str] = [t.name for t in graph.initializer]
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in inits]
        self.output_names: list[str] = [o.name for o in graph.output]

        plan_nodes = []
        label_of: dict[int, str] = {}  # id(node) -> its name or a label naming op, position and output
        for i, node in enumerate(graph.node):
            label_of[id(node)] = _node_label(node, i)
            first = node.output[0] if node.output else ""
            if first in dropped:
                continue
            if first in identity:
                node = identity[first]
                label_of[id(node)] = _node_label(graph.node[i], i)
            if any(x in renamed for x in node.input):
                label = label_of[id(node)]
                node = _with_inputs(node, renamed)  # (kept alive in plan_nodes, so its id stays its own)
                label_of[id(node)] = label
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                key = key_for(node.output[0], "c_")
                self.consts.register_buffer(key, _to_tensor(_constant_value(node, store)))
                self._const_key[node.output[0]] = key
            else:
                plan_nodes.append(node)
        known = set(self.input_names) | set(self._param_key) | set(self._buffer_key) | set(self._const_key)
        ordered = _topological(plan_nodes, known)
        self._plan: list[tuple[str, list[str], list[str], dict[str, Any]]] = [
            (n.op_type, list(n.input), list(n.output), _attrs(n, store)) for n in ordered
        ]
        self._labels: list[str] = [label_of[id(n)] for n in ordered]
        self._producer: dict[str, int] = {o: i for i, (_, _, outs, _) in enumerate(self._plan) for o in outs if o}

        # The fixed-batch rule (docs/bridge.md): nodes whose constant shape may carry the declared batch.
        self.fixed_batch: int | None = _declared_batch(model, self.input_names[0]) if self.input_names else None
        self._batch_rule: dict[int, tuple[int, bool]] = {}  # plan index -> (shape input position or -1, from input)
        if self.fixed_batch is not None:
            from_input = set(self.input_names)
            for i, (op_type, ins, outs, _) in enumerate(self._plan):
                dependent = any(x in from_input for x in ins)
                if dependent:
                    from_input.update(o for o in outs if o)
                pos = _BATCH_SHAPE_INPUT.get(op_type)
                if op_type == "Reshape" and self.opset < 5:
                    self._batch_rule[i] = (-1, dependent)
                elif pos is not None and pos < len(ins) and ins[pos] in self._const_key:
                    self._batch_rule[i] = (pos, bool(ins[0]) and ins[0] in from_input)
        # logits=True: a first output that is Softmax probabilities is returned as the Softmax's input instead
        self.logit_name: str | None = (
            _softmax_input(self._plan, self.output_names[0]) if logits and self.output_names else None
        )
        # Intermediate values are dropped after their last reader (inference memory stays bounded).
        last: dict[str, int] = {}
        for i, (_, ins, _, _) in enumerate(self._plan):
            for x in ins:
                last[x] = i
        keep = set(self.output_names) | ({self.logit_name} if self.logit_name else set())
        self._free: list[list[str]] = [[] for _ in self._plan]
        produced = {o for _, _, outs, _ in self._plan for o in outs}
        for x, i in last.items():
            if x in produced and x not in keep:
                self._free[i].append(x)

    def _new_key(self, name: str, prefix: str) -> str:
        """A fresh attribute-safe key for a tensor name (``\\W`` -> ``_``, numbered on a clash)."""
        base = prefix + re.sub(r"\W", "_", name)
        key, k = base, 1
        while key in self._used_keys:
            key, k = f"{base}_{k}", k + 1
        self._used_keys.add(key)
        return key

    # -- parameters and buffers -------------------------------------------------------------------------------

    def param_for(self, initializer_name: str) -> nn.Parameter:
        """The parameter holding a float initializer (KeyError for an unknown, non-float or buffer initializer)."""
        return self.params[self._param_key[initializer_name]]

    def buffer_for(self, initializer_name: str) -> torch.Tensor:
        """The buffer holding a float initializer read as a statistic (BatchNormalization's running mean and
        variance, Upsample/Resize scales and roi, Dropout's ratio); KeyError for any other name."""
        return getattr(self.float_buffers, self._buffer_key[initializer_name])

    @property
    def float_initializer_names(self) -> list[str]:
        """Names of the initializers that are parameters, in graph order."""
        return [n for n in self.initializer_names if n in self._param_key]

    @property
    def buffer_initializer_names(self) -> list[str]:
        """Names of the float initializers that are buffers (see :meth:`buffer_for`), in graph order."""
        return [n for n in self.initializer_names if n in self._buffer_key]

    def _file_value(self, name: str, t: torch.Tensor) -> np.ndarray:
        t = t.detach().to("cpu")
        if name in self._quantized:
            return self._requantized(name, t)
        arr = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        with np.errstate(over="ignore"):
            return arr.astype(self._dtype[name], copy=True)

    def _requantized(self, name: str, t: torch.Tensor) -> np.ndarray:
        """A dequantized weight's value as its integer initializer: rounded (half to even) on the file's own scale
        and zero point, clipped to the integer type's range (the count in :attr:`quantization_clipped`)."""
        from onnxclp.bridge.ops import _per_axis

        scale, zp, axis = self._quantized[name]
        dtype = self._dtype[name]
        v = t.double() / _per_axis(scale.double(), t.dim(), axis)
        if zp is not None:
            v = v + _per_axis(zp.double(), t.dim(), axis)
        q = np.round(v.numpy())
        info = np.iinfo(dtype)
        self.quantization_clipped[name] = int(((q < info.min) | (q > info.max)).sum())
        return np.clip(q, info.min, info.max).astype(dtype)

    def state_to_onnx(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of the parameters, per initializer name, as numpy arrays in the file's dtype.

        ``names`` restricts the result to those initializers (default: every float initializer that is a
        parameter) and may also name float buffers (:attr:`buffer_initializer_names`); KeyError for any other
        name. A value that does not fit the initializer's dtype (a float16 weight pushed past 65504) comes
        back as inf: the caller's writer (``onnxclp.io.cast_checked``) refuses it.
        """
        out: dict[str, np.ndarray] = {}
        for name in self.float_initializer_names if names is None else names:
            t = self.buffer_for(name) if name in self._buffer_key else self.param_for(name)
            out[name] = self._file_value(name, t)
        return out

    def buffer_values(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of the float buffers (default: all of them), per initializer name, in the file's dtype."""
        return {
            n: self._file_value(n, self.buffer_for(n))
            for n in (self.buffer_initializer_names if names is None else names)
        }

    # -- taps and the plan ------------------------------------------------------------------------------------

    def set_tap(self, tensor_name: str, module: nn.Module) -> None:
        """Replace the tensor ``tensor_name`` by ``module(value)`` in every forward, before any reader sees it.

        ``tensor_name`` is a node's output (a graph output included) or a graph input; the module becomes a
        submodule (``self.taps``), so its parameters are the module's and it follows ``.to(device)``. A
        second tap on the same tensor replaces the first.
        """
        if tensor_name not in self._producer and tensor_name not in self.input_names:
            raise KeyError(f"{tensor_name!r} is neither a graph input nor the output of a node the bridge runs")
        if not isinstance(module, nn.Module):
            raise TypeError(f"a tap must be an nn.Module, got {type(module).__name__}")
        key = self._tap_key.get(tensor_name)
        if key is None:
            key = self._tap_key[tensor_name] = self._new_key(tensor_name, "t_")
        self.taps[key] = module

    def remove_tap(self, tensor_name: str) -> None:
        """Remove the tap on ``tensor_name`` (KeyError when there is none)."""
        key = self._tap_key.pop(tensor_name)
        del self.taps[key]
        self._used_keys.discard(key)

    def taps_by_name(self) -> dict[str, nn.Module]:
        """The taps per tensor name."""
        return {name: self.taps[key] for name, key in self._tap_key.items()}

    def node_of_output(self, tensor_name: str) -> tuple[str, list[str], list[str], dict[str, Any]]:
        """(op type, input names, output names, attributes) of the node producing ``tensor_name``.

        Attributes are decoded values (tensor attributes as torch tensors). KeyError when no executed node
        produces the name (graph inputs, initializers, and Constant nodes, which are buffers).
        """
        op_type, ins, outs, attrs = self._plan[self._producer[tensor_name]]
        return op_type, list(ins), list(outs), {k: v for k, v in attrs.items() if not k.startswith("_")}

    def conv_outputs(self) -> list[tuple[str, str, str | None]]:
        """(output name, weight initializer, bias initializer or None) of each Conv whose weight is an
        initializer, in execution order (the bias is None when absent or not an initializer)."""
        inits = set(self.initializer_names)
        out: list[tuple[str, str, str | None]] = []
        for op_type, ins, outs, _ in self._plan:
            if op_type == "Conv" and len(ins) > 1 and ins[1] in inits and outs and outs[0]:
                out.append((outs[0], ins[1], ins[2] if len(ins) > 2 and ins[2] in inits else None))
        return out

    # -- running ----------------------------------------------------------------------------------------------

    def _value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
        if not name:
            return None
        v = env.get(name)
        if v is not None:
            return v
        key = self._param_key.get(name)
        if key is not None:
            return self.params[key]
        key = self._buffer_key.get(name)
        if key is not None:
            return getattr(self.float_buffers, key)
        return getattr(self.consts, self._const_key[name])

    def _apply_batch_rule(
        self, i: int, op_type: str, args: list[torch.Tensor | None], attrs: dict[str, Any], b0: int, b: int
    ) -> tuple[list[torch.Tensor | None], dict[str, Any]]:
        pos, from_input = self._batch_rule[i]
        if pos < 0:  # Reshape-1: the shape is an attribute
            new = _rebatched(op_type, torch.tensor(attrs["shape"]), args[0], b0, b, from_input)
            return args, attrs if new is None else {**attrs, "shape": new.tolist()}
        shape = args[pos]
        if shape is not None:
            data = args[0] if op_type != "ConstantOfShape" else None
            new = _rebatched(op_type, shape, data, b0, b, from_input)
            if new is not None:
                args = list(args)
                args[pos] = new
        return args, attrs

    def _node_error(self, i: int, exc: Exception) -> OnnxclpError:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        if not first or isinstance(exc, (KeyError, AssertionError, TypeError)):
            first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return OnnxclpError(
            f"the torch bridge cannot run node {self._labels[i]!r} ({self._plan[i][0]}): {first}", EXIT_NOTHING
        )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph on ``inputs`` (the graph inputs that are not initializers, in declaration order).

        A failure inside an op (a shape torch refuses, a value the op cannot take) is an
        :class:`~onnxclp.errors.OnnxclpError` with exit code 3 naming the node and op; the fixed-batch rule
        and the taps are described in docs/bridge.md.
        """
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the model takes {len(self.input_names)} input(s) ({self.input_names}), got {len(inputs)}")
        taps = self.taps_by_name() if self._tap_key else {}
        env: dict[str, torch.Tensor] = {}
        for name, value in zip(self.input_names, inputs, strict=True):
            tap = taps.get(name)
            env[name] = value if tap is None else tap(value)
        return self._run(env, 0, inputs[0] if inputs else None, taps)

    def cuts(self) -> list[str]:
        """The tensors that separate the graph, in execution order: after the node producing one, nothing
        computed earlier (the graph inputs included) is read again, so the rest of the graph depends on the
        input only through it (a residual network's block outputs, a plain network's activations). Graph
        outputs are not cuts; a branch read across the whole graph (``Shape`` of the input feeding a late
        ``Reshape``) leaves none behind it. :meth:`forward_from` runs the graph from one."""
        cached = getattr(self, "_cuts", None)
        if cached is not None:  # the plan does not change after construction
            return list(cached)
        last: dict[str, int] = {}
        for i, (_, ins, _, _) in enumerate(self._plan):
            for x in ins:
                if x:
                    last[x] = i
        outputs = set(self.output_names)
        for o in outputs:  # a graph output is needed to the end
            last[o] = len(self._plan)
        live = {x for x in self.input_names if x in last}
        found: list[str] = []
        for i, (_, _, outs, _) in enumerate(self._plan):
            live = {x for x in live if last.get(x, -1) > i}
            live.update(o for o in outs if o and last.get(o, -1) > i)
            if len(live) == 1 and not any(o in outputs for o in outs):
                (name,) = live
                if name in outs:
                    found.append(name)
        self._cuts = tuple(found)
        return found

    def forward_from(self, tensor_name: str, value: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph's nodes after the one producing ``tensor_name`` (one of :meth:`cuts`) with ``value`` in
        its place: the network's tail on an intermediate representation (FreeEagle's inspected layer). The
        fixed-batch rule reads the batch from ``value``; taps after the cut still apply."""
        if tensor_name not in self.cuts():
            raise KeyError(f"{tensor_name!r} does not separate the graph (see OnnxModule.cuts)")
        taps = self.taps_by_name() if self._tap_key else {}
        return self._run({tensor_name: value}, self._producer[tensor_name] + 1, value, taps)

    def _run(
        self, env: dict[str, torch.Tensor], start: int, first: torch.Tensor | None, taps: dict[str, nn.Module]
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        b0 = self.fixed_batch
        b = int(first.shape[0]) if b0 is not None and first is not None and first.dim() > 0 else None
        for i, ((op_type, ins, outs, attrs), free) in enumerate(zip(self._plan, self._free, strict=True)):
            if i < start:
                continue
            args = [self._value(env, x) for x in ins]
            try:
                if b0 is not None and b is not None and b != b0 and i in self._batch_rule:
                    args, attrs = self._apply_batch_rule(i, op_type, args, attrs, b0, b)
                result = OPS[op_type](args, attrs, self.opset)
            except torch.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError, IndexError, KeyError, TypeError, AssertionError, ArithmeticError) as exc:
                raise self._node_error(i, exc) from exc
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, value in zip(outs, result, strict=False):
                if name:
                    tap = taps.get(name)
                    env[name] = value if tap is None else tap(value)
            for name in free:
                env.pop(name, None)
        values = [self._value(env, o) for o in self.output_names]
        if self.logit_name is not None:
            values[0] = self._value(env, self.logit_name)
        return values[0] if len(values) == 1 else tuple(v for v in values if v is not None)

    def extra_repr(self) -> str:
        return f"opset={self.opset}, nodes={len(self._plan)}, inputs={self.input_names}, outputs={self.output_names}"


_PASS_THROUGH = frozenset({"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Dropout"})


def _softmax_input(plan: list[tuple[str, list[str], list[str], dict[str, Any]]], output: str) -> str | None:
    """The input of the Softmax whose probabilities ``output`` is (through Identity, Flatten, Reshape, Squeeze,
    Unsqueeze or Dropout), when that Softmax normalises over the class axis (1 or -1); else None."""
    producer = {o: step for step in plan for o in step[2] if o}
    name = output
    for _ in range(len(plan)):
        step = producer.get(name)
        if step is None or not step[1]:
            return None
        op_type, ins, _, attrs = step
        if op_type == "Softmax":
            return ins[0] if attrs.get("axis", 1) in (1, -1) else None
        if op_type not in _PASS_THROUGH:
            return None
        name = ins[0]
    return None


def to_torch(
    model: onnx.ModelProto,
    base_dir: str | Path | None = None,
    *,
    store: TensorStore | None = None,
    logits: bool = False,
    float_activations: bool = False,
) -> OnnxModule:
    """An :class:`OnnxModule` running ``model`` (on the CPU; move it with ``.to(device)``).

    ``logits``: when the first output is a Softmax's probabilities (a Keras classifier's last activation, the
    ONNX Model Zoo's classics), return the Softmax's input, the logits, in its place: what a loss, a margin or a
    distillation must read (a cross-entropy of probabilities trains almost nothing). The other outputs and
    every model without such a Softmax are unchanged; predictions (arg-max) are the same either way.

    ``float_activations``: in a QDQ graph, run each activation's QuantizeLinear -> DequantizeLinear pair as the
    float network the quantised one approximates: no rounding and no clipping to the calibration range, except a
    range that starts at 0, a ReLU the quantizer folded into it, which stays a ReLU (the weights stay the
    dequantized integers). For the searches over inputs (MM-BD, FreeEagle, trigger inversion): the clipped range
    caps every class's margin alike (docs/bridge.md, "Quantized weights").

    Tensor values are read through ``store`` (the one :func:`onnxclp.io.load_model` returned), or through a
    new checked :class:`~onnxclp.io.TensorStore` on ``base_dir`` (the model's folder, for external data;
    default: the current directory). Model-local functions are inlined first. Raises :class:`UnsupportedOp`
    (exit 3) when any node cannot be run, naming every such op and node, and :class:`OnnxclpError` for a
    graph that reads an undefined name or has a cycle.
    """
    if store is None:
        store = TensorStore(model, Path(base_dir) if base_dir is not None else Path.cwd())
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return OnnxModule(model, store, logits=logits, float_activations=float_activations)


def load(path: str | Path, *, logits: bool = False) -> OnnxModule:
    """Load an ONNX file with onnxclp's safe loader (:func:`onnxclp.io.load_model`) and bridge it (``logits``: as
    :func:`to_torch`)."""
    model, store = load_model(path)
    return to_torch(model, store=store, logits=logits)


def input_spec(model: onnx.ModelProto) -> tuple[tuple[int | None, ...], np.dtype]:
    """(shape, dtype) of the graph's first input that is not an initializer, batch dimension included.

    A dimension that is symbolic (``batch``) or unknown is None. Raises :class:`OnnxclpError` when the
    graph has no such input or the input is not a tensor.
    """
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise OnnxclpError(f"graph input {vi.name!r} is not a tensor")
        tt = vi.type.tensor_type
        if tt.elem_type == TensorProto.UNDEFINED:
            raise OnnxclpError(f"graph input {vi.name!r} has no element type")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if not tt.HasField("shape"):
            raise OnnxclpError(f"graph input {vi.name!r} has no declared shape")
        dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim)
        return dims, dtype
    raise OnnxclpError("the graph has no input that is not an initializer")
