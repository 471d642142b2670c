"""ONNX -> PyTorch bridge: run an ONNX classifier as a ``torch.nn.Module`` whose weights are parameters.

The data-free methods that optimise inputs or unlearn weights (MM-BD, OTBR; docs/bridge.md) need gradients
through the model. onnx2torch cannot be used on the project's machines: it imports torchvision, whose build
from the package registry does not load against the CPU-only torch (``operator torchvision::nms does not
exist``). This package is a small executor instead: :func:`to_torch` checks every node against the operators
of :mod:`onnxclp.bridge.ops` (raising :class:`UnsupportedOp`, naming every unsupported op and node, before
anything runs) and returns an :class:`OnnxModule` that runs the graph node by node in topological order.

Every floating-point initializer becomes an ``nn.Parameter`` (:meth:`OnnxModule.param_for`); integer
initializers and Constant nodes become buffers. :meth:`OnnxModule.state_to_onnx` gives the current values
per initializer name, in each initializer's own dtype, for the caller to write back through onnxclp's
editor; the ONNX file itself is never touched here. Tensor values are read through
:class:`onnxclp.io.TensorStore`, so external data goes through the same safety checks as everywhere else.
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
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32, order="C")).to(torch.bfloat16)
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
            reason = unsupported_reason(node.op_type, attrs, len([o for o in node.output if o]))
            if reason:
                bad[f"{node.op_type} ({reason})"].append(label)
    if graph.sparse_initializer:
        bad["sparse_initializer"].extend(t.values.name for t in graph.sparse_initializer)
    if bad:
        raise UnsupportedOp(bad)


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

    def __init__(self, model: onnx.ModelProto, store: TensorStore) -> None:
        super().__init__()
        graph = model.graph
        self.opset = _default_opset(model)
        _check(graph, self.opset)
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self._param_key: dict[str, str] = {}  # initializer name -> key in self.params
        self._const_key: dict[str, str] = {}  # tensor name -> buffer name in self.consts
        self._dtype: dict[str, np.dtype] = {}  # initializer name -> its numpy dtype in the file
        used: set[str] = set()

        def key_for(name: str, prefix: str) -> str:
            base = prefix + re.sub(r"\W", "_", name)
            key, k = base, 1
            while key in used:
                key, k = f"{base}_{k}", k + 1
            used.add(key)
            return key

        inits = {t.name: t for t in graph.initializer}
        for t in graph.initializer:
            arr = store.read(t)
            self._dtype[t.name] = arr.dtype
            if _is_float(arr):
                key = key_for(t.name, "p_")
                self.params[key] = nn.Parameter(_to_tensor(arr))
                self._param_key[t.name] = key
            else:
                key = key_for(t.name, "c_")
                self.consts.register_buffer(key, _to_tensor(arr))
                self._const_key[t.name] = key
        self.initializer_names: list[str] = [t.name for t in graph.initializer]
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in inits]
        self.output_names: list[str] = [o.name for o in graph.output]

        plan_nodes = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                key = key_for(node.output[0], "c_")
                self.consts.register_buffer(key, _to_tensor(_constant_value(node, store)))
                self._const_key[node.output[0]] = key
            else:
                plan_nodes.append(node)
        known = set(self.input_names) | set(self._param_key) | set(self._const_key)
        ordered = _topological(plan_nodes, known)
        self._plan: list[tuple[str, list[str], list[str], dict[str, Any]]] = [
            (n.op_type, list(n.input), list(n.output), _attrs(n, store)) for n in ordered
        ]
        # Intermediate values are dropped after their last reader (inference memory stays bounded).
        last: dict[str, int] = {}
        for i, (_, ins, _, _) in enumerate(self._plan):
            for x in ins:
                last[x] = i
        keep = set(self.output_names)
        self._free: list[list[str]] = [[] for _ in self._plan]
        produced = {o for _, _, outs, _ in self._plan for o in outs}
        for x, i in last.items():
            if x in produced and x not in keep:
                self._free[i].append(x)

    # -- parameters -------------------------------------------------------------------------------------------

    def param_for(self, initializer_name: str) -> nn.Parameter:
        """The parameter holding a float initializer (KeyError for an unknown or non-float initializer)."""
        return self.params[self._param_key[initializer_name]]

    @property
    def float_initializer_names(self) -> list[str]:
        """Names of the initializers that are parameters, in graph order."""
        return [n for n in self.initializer_names if n in self._param_key]

    def state_to_onnx(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Current values of the parameters, per initializer name, as numpy arrays in the file's dtype.

        ``names`` restricts the result to those initializers (default: every float initializer). A value
        that does not fit the initializer's dtype (a float16 weight pushed past 65504) comes back as inf:
        the caller's writer (``onnxclp.io.cast_checked``) refuses it.
        """
        out: dict[str, np.ndarray] = {}
        for name in self.float_initializer_names if names is None else names:
            t = self.param_for(name).detach().to("cpu")
            dtype = self._dtype[name]
            arr = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            with np.errstate(over="ignore"):
                out[name] = arr.astype(dtype, copy=True)
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
        return getattr(self.consts, self._const_key[name])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"the model takes {len(self.input_names)} input(s) ({self.input_names}), got {len(inputs)}")
        env: dict[str, torch.Tensor] = dict(zip(self.input_names, inputs, strict=True))
        for (op_type, ins, outs, attrs), free in zip(self._plan, self._free, strict=True):
            args = [self._value(env, x) for x in ins]
            result = OPS[op_type](args, attrs, self.opset)
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, value in zip(outs, result, strict=False):
                if name:
                    env[name] = value
            for name in free:
                env.pop(name, None)
        values = [self._value(env, o) for o in self.output_names]
        return values[0] if len(values) == 1 else tuple(v for v in values if v is not None)

    def extra_repr(self) -> str:
        return f"opset={self.opset}, nodes={len(self._plan)}, inputs={self.input_names}, outputs={self.output_names}"


def to_torch(
    model: onnx.ModelProto, base_dir: str | Path | None = None, *, store: TensorStore | None = None
) -> OnnxModule:
    """An :class:`OnnxModule` running ``model`` (on the CPU; move it with ``.to(device)``).

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
    return OnnxModule(model, store)


def load(path: str | Path) -> OnnxModule:
    """Load an ONNX file with onnxclp's safe loader (:func:`onnxclp.io.load_model`) and bridge it."""
    model, store = load_model(path)
    return to_torch(model, store=store)


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
