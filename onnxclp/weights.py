"""Values of constants as a layer sees them, through the nodes between storage and layer, and back.

Exporters do not always feed a weight straight from an initializer: tf2onnx may Transpose or Reshape a
shared kernel, mixed-precision exports Cast a float16 weight, and QDQ-quantized models (onnxruntime's
``quantize_static``) read ``DequantizeLinear(q, scale, zero_point)``. :func:`read` applies that chain to the
stored value; :func:`write` inverts it, so an edit lands in the stored tensor in its own form:

- Transpose, Reshape, Squeeze, Unsqueeze, Identity: exact inverses (each in the form of its opset: ``axes`` an
  attribute or an input, Reshape's ``shape`` an attribute before opset 5, Cast's ``to`` a type name before 6);
- Cast: the value is cast back to the stored dtype (float16 stays float16);
- DequantizeLinear: a zeroed channel or weight gets the zero-point as its quantized value (exactly 0 after
  dequantization); a channel scaled by ``c`` gets its per-channel scale multiplied by ``c``; any other change
  is requantized with the existing scale.
- QuantizeLinear (a float weight fake-quantised, ``W -> QuantizeLinear -> DequantizeLinear``, as
  quantisation-aware training exports it): the integers the DequantizeLinear step asks for are written as the
  float weight that quantises to them on the QuantizeLinear's own (possibly just rescaled) scale; a weight whose
  integer is unchanged keeps its stored float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import NodeProto

from onnxclp.errors import OnnxclpError
from onnxclp.graph import ConstSource, GraphIndex
from onnxclp.tensors import TensorStore, cast_checked

_ATTR_TYPES = {
    "perm": onnx.AttributeProto.INTS,
    "shape": onnx.AttributeProto.INTS,
    "axes": onnx.AttributeProto.INTS,
    "allowzero": onnx.AttributeProto.INT,
    "to": (onnx.AttributeProto.INT, onnx.AttributeProto.STRING),  # Cast before opset 6: a type name
    "axis": onnx.AttributeProto.INT,
    "block_size": onnx.AttributeProto.INT,
}
_ATTR_NAMES = {v: k for k, v in onnx.AttributeProto.AttributeType.items()}


def _attr(node: NodeProto, name: str, default=None):
    """The attribute's value; one of the wrong type (a float ``axes``, from a hostile file) is refused."""
    for a in node.attribute:
        if a.name == name:
            want = _ATTR_TYPES.get(name)
            allowed = want if isinstance(want, tuple) else (want,)
            if want is not None and a.type not in allowed:
                got = _ATTR_NAMES.get(a.type, str(a.type))
                names = " or ".join(_ATTR_NAMES[t] for t in allowed)
                raise OnnxclpError(f"{node.op_type} {node.name!r}: attribute {name!r} is {got}, not {names}")
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass
class _Step:
    node: NodeProto
    before: np.ndarray  # the value entering this node


def _const_value(index: GraphIndex, store: TensorStore, name: str) -> np.ndarray:
    src = index.constant(name)
    if src is None:  # checked when the chain was resolved
        raise OnnxclpError(f"{name!r} is not a constant")
    return read(index, store, src)


def _int_values(index: GraphIndex, store: TensorStore, node: NodeProto, i: int) -> list[int]:
    """A shape or axes input: the ONNX spec makes it int64; anything else (NaN included) is refused."""
    value = _const_value(index, store, node.input[i])
    if value.dtype.kind not in "iu":
        raise OnnxclpError(f"{node.op_type} {node.name!r}: input {i} has type {value.dtype}, not an integer type")
    return [int(v) for v in value.reshape(-1)]


def _cast_target(node: NodeProto) -> int:
    """A Cast's target type: an int from opset 6, a type name ("FLOAT") before."""
    to = _attr(node, "to", onnx.TensorProto.FLOAT)
    if isinstance(to, bytes | str):
        name = to.decode() if isinstance(to, bytes) else to
        try:
            return int(onnx.TensorProto.DataType.Value(name.upper()))
        except ValueError as exc:
            raise OnnxclpError(f"Cast {node.name!r}: unknown target type {name[:40]!r}") from exc
    return int(to)


def _apply(index: GraphIndex, store: TensorStore, node: NodeProto, x: np.ndarray) -> np.ndarray:
    op = node.op_type
    if op == "Identity":
        return x
    if op == "Transpose":
        perm = _attr(node, "perm")
        if perm is not None and sorted(perm) != list(range(x.ndim)):
            raise OnnxclpError(f"Transpose {node.name!r}: perm {list(perm)} does not permute {x.ndim} axes")
        return np.transpose(x, perm if perm is not None else None)
    if op == "Reshape":
        if len(node.input) > 1 and node.input[1]:
            shape = _int_values(index, store, node, 1)
        else:  # Reshape before opset 5: the shape is an attribute
            shape = [int(d) for d in _attr(node, "shape", []) or []]
        if not _attr(node, "allowzero", 0):
            shape = [x.shape[i] if d == 0 and i < x.ndim else d for i, d in enumerate(shape)]
        try:
            return x.reshape(shape)
        except ValueError as exc:
            raise OnnxclpError(f"Reshape {node.name!r}: cannot reshape {list(x.shape)} to {shape}") from exc
    if op in ("Squeeze", "Unsqueeze"):
        if len(node.input) > 1 and node.input[1]:
            axes = _int_values(index, store, node, 1)
        else:
            axes = list(_attr(node, "axes", []) or [])
        rank = x.ndim if op == "Squeeze" else x.ndim + len(axes)
        if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
            raise OnnxclpError(f"{op} {node.name!r}: axes {axes} do not fit a weight of rank {x.ndim}")
        if op == "Squeeze":
            if any(x.shape[a] != 1 for a in axes):
                raise OnnxclpError(f"Squeeze {node.name!r}: axes {axes} of shape {list(x.shape)} are not 1")
            return np.squeeze(x, axis=tuple(a % rank for a in axes)) if axes else np.squeeze(x)
        out = x
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Cast":
        to = _cast_target(node)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
        except (KeyError, ValueError, TypeError) as exc:
            raise OnnxclpError(f"Cast {node.name!r}: unsupported target type {to}") from exc
        if dtype.kind in "iub" and x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            raise OnnxclpError(f"Cast {node.name!r}: NaN or Inf cast to an integer type")
        return cast_checked(x, dtype, f"Cast {node.name!r}", noun="weight")
    if op == "DequantizeLinear":
        scale, zp, _ = _dq_params(index, store, node, x)
        dtype = scale.dtype if scale.dtype.kind == "f" else np.dtype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            out = ((x.astype(np.float64) - zp) * scale).astype(dtype)
        if not np.all(np.isfinite(out)):
            raise OnnxclpError(f"DequantizeLinear {node.name!r}: dequantized weight is NaN or Inf in {dtype.name}")
        return out
    if op == "QuantizeLinear":
        scale, zp, _ = _dq_params(index, store, node, x)
        dtype = _quantized_dtype(index, store, node)
        info = np.iinfo(dtype)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            q = np.round(x.astype(np.float64) / scale) + zp  # half to even, as the spec says
        if not np.all(np.isfinite(q)):
            raise OnnxclpError(f"QuantizeLinear {node.name!r}: the quantized weight is NaN or Inf")
        return np.clip(q, info.min, info.max).astype(dtype)
    raise OnnxclpError(f"unsupported node {op!r} between a weight and its layer")


def _quantized_dtype(index: GraphIndex, store: TensorStore, node: NodeProto) -> np.dtype:
    """A QuantizeLinear's integer type: its zero point's, else ``output_dtype`` (opset 21), else uint8."""
    if len(node.input) > 2 and node.input[2]:
        dtype = _const_value(index, store, node.input[2]).dtype
    else:
        to = int(_attr(node, "output_dtype", 0) or onnx.TensorProto.UINT8)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to))
    if dtype.kind not in "iu":
        raise OnnxclpError(f"QuantizeLinear {node.name!r}: quantizes to {dtype}, not an integer type")
    return dtype


def _dq_params(index: GraphIndex, store: TensorStore, node: NodeProto, q: np.ndarray):
    """Scale and zero point of a DequantizeLinear, broadcast against ``q``; and the per-channel axis."""
    scale = _const_value(index, store, node.input[1])
    zp = (
        _const_value(index, store, node.input[2]).astype(np.float64)
        if len(node.input) > 2 and node.input[2]
        else np.zeros(1)
    )
    axis = None
    if scale.size == 1 and zp.size != 1:
        raise OnnxclpError(f"DequantizeLinear {node.name!r}: {zp.size} zero points for one scale")
    if scale.size > 1:
        axis = int(_attr(node, "axis", 1))
        if not -q.ndim <= axis < q.ndim or scale.size != q.shape[axis] or zp.size not in (1, scale.size):
            raise OnnxclpError(
                f"DequantizeLinear {node.name!r}: {scale.size} scales and {zp.size} zero points on axis {axis} "
                f"do not match a weight of shape {list(q.shape)}"
            )
        axis %= q.ndim
        if int(_attr(node, "block_size", 0) or 0):
            raise OnnxclpError(f"DequantizeLinear {node.name!r}: blocked quantization is not supported")
        shape = [1] * q.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zp = zp.reshape(shape) if zp.size > 1 else zp.reshape([1] * q.ndim)
    return scale, zp, axis


def read(index: GraphIndex, store: TensorStore, src: ConstSource) -> np.ndarray:
    """The constant's value as its reader sees it (writable; a copy)."""
    value = store.read(src.tensor)
    for node in reversed(src.via):
        value = _apply(index, store, node, value)
    return np.array(value, copy=True)


def trace(index: GraphIndex, store: TensorStore, src: ConstSource) -> tuple[np.ndarray, list[_Step]]:
    """:func:`read`, keeping the value that enters each node of the chain (for :func:`write`)."""
    value = store.read(src.tensor)
    steps = []
    for node in reversed(src.via):
        steps.append(_Step(node, value))
        value = _apply(index, store, node, value)
    return np.array(value, copy=True), steps


def exclusive(index: GraphIndex, src: ConstSource, reader: NodeProto) -> bool:
    """Whether only ``reader`` (once) sees the stored constant and every value along its chain."""
    names = [src.tensor.name if src.initializer else src.node.output[0]]
    names += [n.output[0] for n in reversed(src.via)]
    expected = [*list(reversed(src.via)), reader]
    for name, nxt in zip(names, expected, strict=True):
        users = index.consumers.get(name, [])
        if name in index.graph_outputs or index.subgraph_reads.get(name):
            return False
        if len(users) != 1 or users[0] is not nxt or list(nxt.input).count(name) != 1:
            return False
    return True


def invert(index: GraphIndex, store: TensorStore, steps: list[_Step], new: np.ndarray, editor) -> np.ndarray:
    """The stored value that yields ``new`` after the chain; writes DequantizeLinear scales on the way."""
    value = new
    for step in reversed(steps):
        node, before = step.node, step.before
        op = node.op_type
        if op == "Transpose":
            perm = _attr(node, "perm")
            value = np.transpose(value, np.argsort(perm) if perm is not None else None)
        elif op in ("Identity", "Reshape", "Squeeze", "Unsqueeze"):
            value = np.reshape(value, before.shape)
        elif op == "Cast":
            value = value.astype(before.dtype)
        elif op == "DequantizeLinear":
            value = _requantize(index, store, node, before, value, editor)
        elif op == "QuantizeLinear":
            value = _unquantize(index, store, node, before, value)
    return value


def _unquantize(index, store, node, w: np.ndarray, q_new: np.ndarray) -> np.ndarray:
    """The float weight that a QuantizeLinear turns into ``q_new``: unchanged where its integer is unchanged, else
    ``(q - zero point) * scale`` on the node's scale as it is now (a rescaled channel's scale already written)."""
    scale, zp, _ = _dq_params(index, store, node, w)
    q_old = _apply(index, store, node, w)
    changed = np.asarray(q_new) != q_old
    out = np.array(w, copy=True)
    if changed.any():
        exact = (np.asarray(q_new, dtype=np.float64) - zp) * scale
        out[changed] = exact.astype(w.dtype)[changed]
    return out


def _requantize(index, store, node, q: np.ndarray, new: np.ndarray, editor) -> np.ndarray:
    scale, zp, axis = _dq_params(index, store, node, q)
    old = (q.astype(np.float64) - zp) * scale
    new = np.asarray(new, dtype=np.float64)
    q_new = q.copy()
    info = np.iinfo(q.dtype) if q.dtype.kind in "iu" else None
    zp_full = np.broadcast_to(zp, q.shape)
    changed = new != old
    if not changed.any():
        return q
    # Exact zeros: the zero point.
    zero = changed & (new == 0)
    q_new[zero] = zp_full[zero].astype(q.dtype)
    rest = changed & ~zero
    if rest.any() and axis is not None:
        # Whole channels scaled by one factor: change that channel's scale, keep its integers.
        moved = np.moveaxis(rest, axis, 0).reshape(rest.shape[axis], -1).any(axis=1)
        o = np.moveaxis(old, axis, 0).reshape(old.shape[axis], -1)
        n = np.moveaxis(new, axis, 0).reshape(new.shape[axis], -1)
        new_scale = np.array(scale.reshape(-1), dtype=np.float64)
        handled = np.zeros(len(moved), dtype=bool)
        for k in np.flatnonzero(moved):
            denom = float(o[k] @ o[k])
            if denom == 0:
                continue
            c = float(o[k] @ n[k]) / denom
            if np.allclose(n[k], c * o[k], rtol=1e-6, atol=1e-12) and c > 0:
                new_scale[k] *= c
                handled[k] = True
        if handled.any():
            scale_src = index.constant(node.input[1])
            stored_shape = read(index, store, scale_src).shape
            editor.write_constant(scale_src, node, 1, new_scale.astype(scale.dtype).reshape(stored_shape))
            mask = np.moveaxis(
                np.broadcast_to(handled.reshape([-1] + [1] * (q.ndim - 1)), np.moveaxis(q, axis, 0).shape), 0, axis
            )
            rest = rest & ~mask
    if rest.any():
        requant = np.round(new / scale + zp)
        if info is not None:
            requant = np.clip(requant, info.min, info.max)
        q_new[rest] = requant.astype(q.dtype)[rest]
    return q_new
