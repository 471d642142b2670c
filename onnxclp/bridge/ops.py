"""Torch implementations of the ONNX operators that CNN classifiers use, one function per operator.

Each function takes the node's inputs (torch tensors, ``None`` for an omitted optional input), its attributes
(a plain dict, already decoded) and the model's default-domain opset, and returns one tensor or a tuple of
tensors (the node's outputs in order). Semantics follow the ONNX operator specification
(https://onnx.ai/onnx/operators/), including the attribute-vs-input forms that changed between opsets
(Clip 11, Squeeze/Unsqueeze/Split/ReduceSum 13, the other Reduce* 18, Pad 11, Slice 10). Integer tensors
(shapes, indices) stay int64 torch tensors on the model's device; an operator that needs their values reads
them with ``.tolist()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from onnx import TensorProto

Tensor = torch.Tensor
OpResult = Tensor | tuple[Tensor, ...]
OpFn = Callable[[list[Tensor | None], dict[str, Any], int], OpResult]

OPS: dict[str, OpFn] = {}

# ONNX element type -> torch dtype (the types a classifier's graph carries).
TORCH_DTYPE: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}


def op(*names: str) -> Callable[[OpFn], OpFn]:
    """Register a function as the implementation of the ONNX operator(s) ``names``."""

    def deco(fn: OpFn) -> OpFn:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _spatial_pads(
    x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], attrs: dict[str, Any]
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] for a Conv/pool, resolving auto_pad from the input's size."""
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - small if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * n)
    return list(attrs.get("pads", [0] * (2 * n)))


def _symmetric(pads: Sequence[int]) -> list[int] | None:
    n = len(pads) // 2
    return list(pads[:n]) if list(pads[:n]) == list(pads[n:]) else None


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX spatial pads [b1.., e1..] -> F.pad's (last_begin, last_end, ..., first_begin, first_end)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [pads[i], pads[n + i]]
    return out


# ------------------------------------------------------------------------------------------------------------
# convolutions and normalisation

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def conv(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, w, b = x[0], x[1], x[2] if len(x) > 2 else None
    assert inp is not None and w is not None
    n = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = _spatial_pads(inp, kernel, strides, dil, a)
    sym = _symmetric(pads)
    if sym is None:
        inp = F.pad(inp, _torch_pad(pads))
        sym = [0] * n
    return _CONV[n](inp, w, b, strides, sym, dil, int(a.get("group", 1)))


@op("ConvTranspose")
def conv_transpose(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, w, b = x[0], x[1], x[2] if len(x) > 2 else None
    assert inp is not None and w is not None
    n = w.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    out_pad = list(a.get("output_padding", [0] * n))
    full = [strides[i] * (inp.shape[2 + i] - 1) + out_pad[i] + (kernel[i] - 1) * dil[i] + 1 for i in range(n)]
    auto = a.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    target = list(a["output_shape"])[-n:] if "output_shape" in a else None
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [inp.shape[2 + i] * strides[i] for i in range(n)]
    if target is not None:
        total = [full[i] - target[i] for i in range(n)]
        if auto == "SAME_UPPER":
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [t - t // 2 for t in total] + [t // 2 for t in total]
    elif auto == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(a.get("pads", [0] * (2 * n)))
    y = _CONVT[n](inp, w, None, strides, 0, 0, int(a.get("group", 1)), dil)
    if any(out_pad):  # the extra trailing elements get no contribution, only the bias
        y = F.pad(y, _torch_pad([0] * n + out_pad))
    y = F.pad(y, _torch_pad([-p for p in pads]))  # crops; a negative pad (output_shape > full) extends
    if b is not None:
        y = y + b.reshape(1, -1, *([1] * n))
    return y


@op("BatchNormalization")
def batch_norm(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, scale, bias, mean, var = x[:5]
    assert inp is not None and mean is not None and var is not None
    return F.batch_norm(inp, mean, var, scale, bias, training=False, eps=float(a.get("epsilon", 1e-5)))


@op("InstanceNormalization")
def instance_norm(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, scale, bias = x[:3]
    assert inp is not None
    return F.instance_norm(inp, weight=scale, bias=bias, eps=float(a.get("epsilon", 1e-5)))


@op("LayerNormalization")
def layer_norm(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, scale, bias = x[0], x[1], x[2] if len(x) > 2 else None
    assert inp is not None
    axis = _axis(int(a.get("axis", -1)), inp.dim())
    return F.layer_norm(inp, tuple(inp.shape[axis:]), scale, bias, float(a.get("epsilon", 1e-5)))


# ------------------------------------------------------------------------------------------------------------
# activations and element-wise arithmetic


def _unary(fn: Callable[[Tensor], Tensor]) -> OpFn:
    return lambda x, a, opset: fn(x[0])  # type: ignore[arg-type]


for _name, _fn in {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "HardSwish": F.hardswish,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Erf": torch.erf,
    "Softsign": F.softsign,
    "Not": torch.logical_not,
    "Sin": torch.sin,
    "Cos": torch.cos,
}.items():
    OPS[_name] = _unary(_fn)


@op("Identity")
def identity(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return x[0]


@op("Dropout")
def dropout(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Inference: the input unchanged, and an all-true mask for a second output."""
    assert x[0] is not None
    return x[0], torch.ones_like(x[0], dtype=torch.bool)


@op("LeakyRelu")
def leaky_relu(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return F.leaky_relu(x[0], float(a.get("alpha", 0.01)))


@op("Elu")
def elu(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return F.elu(x[0], float(a.get("alpha", 1.0)))


@op("Selu")
def selu(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    alpha, gamma = float(a.get("alpha", 1.67326319217681884765625)), float(a.get("gamma", 1.05070102214813232421875))
    return gamma * torch.where(x[0] > 0, x[0], alpha * (torch.exp(x[0]) - 1))


@op("Softplus")
def softplus(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return F.softplus(x[0])


@op("Gelu")
def gelu(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    approx = a.get("approximate", "none")
    return F.gelu(x[0], approximate=approx.decode() if isinstance(approx, bytes) else approx)


@op("PRelu")
def prelu(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, slope = x[0], x[1]
    assert inp is not None and slope is not None
    return torch.where(inp >= 0, inp, inp * slope)


@op("HardSigmoid")
def hard_sigmoid(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return torch.clamp(float(a.get("alpha", 0.2)) * x[0] + float(a.get("beta", 0.5)), 0.0, 1.0)


@op("Clip")
def clip(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    if opset < 11:
        lo: Tensor | float | None = a.get("min")
        hi: Tensor | float | None = a.get("max")
    else:
        lo = x[1] if len(x) > 1 else None
        hi = x[2] if len(x) > 2 else None
    if lo is not None:
        inp = torch.clamp(inp, min=lo.to(inp.dtype) if isinstance(lo, Tensor) else float(lo))
    if hi is not None:
        inp = torch.clamp(inp, max=hi.to(inp.dtype) if isinstance(hi, Tensor) else float(hi))
    return inp


def _div(p: Tensor, q: Tensor) -> Tensor:
    if p.dtype.is_floating_point or q.dtype.is_floating_point:
        return p / q
    return torch.div(p, q, rounding_mode="trunc")  # integer Div truncates (as C does)


for _name, _fn2 in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _div,
    "Pow": torch.pow,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
}.items():
    OPS[_name] = (lambda f: lambda x, a, opset: f(x[0], x[1]))(_fn2)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
        vals = [t for t in x if t is not None]
        out = vals[0]
        for t in vals[1:]:
            out = fn(out, t)
        return out

    return run


OPS["Sum"] = _variadic(torch.add)
OPS["Max"] = _variadic(torch.maximum)
OPS["Min"] = _variadic(torch.minimum)


@op("Mean")
def mean(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    vals = [t for t in x if t is not None]
    return _variadic(torch.add)(x, a, opset) / len(vals)  # type: ignore[operator]


@op("Where")
def where(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    c, p, q = x[:3]
    assert c is not None and p is not None and q is not None
    return torch.where(c, p, q)


@op("Softmax", "LogSoftmax")
def softmax(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    fn = torch.log_softmax if a.get("_op") == "LogSoftmax" else torch.softmax
    if opset >= 13:
        return fn(inp, _axis(int(a.get("axis", -1)), inp.dim()))
    # Before opset 13: the input is coerced to 2-D at ``axis`` (default 1) and normalised over the second part.
    axis = _axis(int(a.get("axis", 1)), inp.dim())
    lead = math.prod(inp.shape[:axis])
    return fn(inp.reshape(lead, -1), 1).reshape(inp.shape)


# ------------------------------------------------------------------------------------------------------------
# linear algebra


@op("MatMul")
def matmul(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None and x[1] is not None
    return torch.matmul(x[0], x[1])


@op("Gemm")
def gemm(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    A, B, C = x[0], x[1], x[2] if len(x) > 2 else None
    assert A is not None and B is not None
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    y = torch.matmul(A, B)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = alpha * y
    if C is not None and beta != 0.0:
        y = y + (C if beta == 1.0 else beta * C)
    return y


@op("Einsum")
def einsum(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    eq = a["equation"]
    return torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *[t for t in x if t is not None])


# ------------------------------------------------------------------------------------------------------------
# pooling

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_args(inp: Tensor, a: dict[str, Any]) -> tuple[list[int], list[int], list[int], list[int], bool]:
    kernel = list(a["kernel_shape"])
    n = len(kernel)
    strides = list(a.get("strides", [1] * n))
    dil = list(a.get("dilations", [1] * n))
    pads = _spatial_pads(inp, kernel, strides, dil, a)
    return kernel, strides, dil, pads, bool(a.get("ceil_mode", 0))


@op("MaxPool")
def max_pool(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    kernel, strides, dil, pads, ceil = _pool_args(inp, a)
    n = len(kernel)
    sym = _symmetric(pads)
    if sym is None or any(2 * p > k for p, k in zip(sym, kernel, strict=True)):
        fill = -math.inf if inp.dtype.is_floating_point else torch.iinfo(inp.dtype).min
        inp = F.pad(inp, _torch_pad(pads), value=fill)
        sym = [0] * n
    return _MAXPOOL[n](inp, kernel, strides, sym, dil, ceil_mode=ceil)


@op("AveragePool")
def avg_pool(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    kernel, strides, _dil, pads, ceil = _pool_args(inp, a)
    n = len(kernel)
    include = bool(a.get("count_include_pad", 0))
    sym = _symmetric(pads)
    if sym is not None and all(2 * p <= k for p, k in zip(sym, kernel, strict=True)) and not (ceil and include):
        return _AVGPOOL[n](inp, kernel, strides, sym, ceil_mode=ceil, count_include_pad=include)
    # General case: explicit padding; the mean is (sum of x) / (count of the elements the spec counts).
    tp = _torch_pad(pads)
    xp = F.pad(inp, tp)
    ones = torch.ones((1, 1, *inp.shape[2:]), dtype=inp.dtype, device=inp.device)
    mask = F.pad(ones, tp, value=1.0 if include else 0.0)
    pool = _AVGPOOL[n]
    num = pool(xp, kernel, strides, 0, ceil_mode=ceil, count_include_pad=False)
    den = pool(mask, kernel, strides, 0, ceil_mode=ceil, count_include_pad=False)
    return num / den


@op("GlobalAveragePool")
def global_avg_pool(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return torch.amax(x[0], dim=tuple(range(2, x[0].dim())), keepdim=True)


# ------------------------------------------------------------------------------------------------------------
# reductions


def _reduce(x: list[Tensor | None], a: dict[str, Any], opset: int, axes_input_from: int) -> tuple[Tensor, Any, bool]:
    """(input, dims or None for all, keepdims) of a Reduce*; axes moved from attribute to input at ``axes_input_from``."""
    inp = x[0]
    assert inp is not None
    if opset >= axes_input_from:
        axes = _ints(x[1]) if len(x) > 1 else None
    else:
        axes = list(a["axes"]) if "axes" in a else None
    keep = bool(a.get("keepdims", 1))
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return inp, (), keep
        return inp, tuple(range(inp.dim())), keep
    return inp, tuple(_axis(v, inp.dim()) for v in axes), keep


def _reducer(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor], since: int) -> OpFn:
    def run(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
        inp, dims, keep = _reduce(x, a, opset, since)
        return inp if dims == () else fn(inp, dims, keep)

    return run


OPS["ReduceMean"] = _reducer(lambda t, d, k: t.mean(dim=d, keepdim=k), 18)
OPS["ReduceSum"] = _reducer(lambda t, d, k: t.sum(dim=d, keepdim=k), 13)
OPS["ReduceMax"] = _reducer(lambda t, d, k: torch.amax(t, dim=d, keepdim=k), 18)
OPS["ReduceMin"] = _reducer(lambda t, d, k: torch.amin(t, dim=d, keepdim=k), 18)


def _prod(t: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        t = t.prod(dim=d, keepdim=keep)
    return t


OPS["ReduceProd"] = _reducer(_prod, 18)
OPS["ReduceL2"] = _reducer(lambda t, d, k: torch.sqrt((t * t).sum(dim=d, keepdim=k)), 18)
OPS["ReduceSumSquare"] = _reducer(lambda t, d, k: (t * t).sum(dim=d, keepdim=k), 18)


@op("ArgMax", "ArgMin")
def arg_max(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    axis = _axis(int(a.get("axis", 0)), inp.dim())
    keep = bool(a.get("keepdims", 1))
    if a.get("select_last_index", 0):
        flipped = inp.flip(axis)
        idx = (torch.argmax if a["_op"] == "ArgMax" else torch.argmin)(flipped, dim=axis, keepdim=keep)
        return inp.shape[axis] - 1 - idx
    return (torch.argmax if a["_op"] == "ArgMax" else torch.argmin)(inp, dim=axis, keepdim=keep)


# ------------------------------------------------------------------------------------------------------------
# shapes and indexing


@op("Flatten")
def flatten(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    axis = _axis(int(a.get("axis", 1)), inp.dim())
    return inp.reshape(math.prod(inp.shape[:axis]), math.prod(inp.shape[axis:]))


@op("Reshape")
def reshape(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    shape = list(a["shape"]) if opset < 5 else _ints(x[1])
    assert shape is not None
    if not a.get("allowzero", 0):
        shape = [inp.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return inp.reshape(shape)


@op("Transpose")
def transpose(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    perm = list(a.get("perm", reversed(range(inp.dim()))))
    return inp.permute(perm)


@op("Squeeze")
def squeeze(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    axes = (_ints(x[1]) if len(x) > 1 else None) if opset >= 13 else a.get("axes")
    if axes is None:
        return inp.squeeze()
    dims = sorted({_axis(int(v), inp.dim()) for v in axes}, reverse=True)
    for d in dims:
        inp = inp.squeeze(d)
    return inp


@op("Unsqueeze")
def unsqueeze(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    axes = _ints(x[1]) if opset >= 13 else list(a["axes"])
    assert axes is not None
    rank = inp.dim() + len(axes)
    for d in sorted(_axis(int(v), rank) for v in axes):
        inp = inp.unsqueeze(d)
    return inp


@op("Concat")
def concat(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    vals = [t for t in x if t is not None]
    return torch.cat(vals, dim=_axis(int(a["axis"]), vals[0].dim()))


@op("Split")
def split(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    axis = _axis(int(a.get("axis", 0)), inp.dim())
    sizes = (_ints(x[1]) if len(x) > 1 else None) if opset >= 13 else a.get("split")
    if not sizes:
        n = int(a.get("num_outputs", a["_n_outputs"]))
        chunk = -(-inp.shape[axis] // n)
        sizes = [chunk] * (n - 1) + [inp.shape[axis] - chunk * (n - 1)]
    return tuple(torch.split(inp, list(sizes), dim=axis))


@op("Shape")
def shape(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    dims = list(inp.shape)
    start, end = int(a.get("start", 0)), a.get("end")
    rank = len(dims)
    start = min(max(_axis(start, rank), 0), rank)
    stop = rank if end is None else min(max(_axis(int(end), rank), 0), rank)
    return torch.tensor(dims[start:stop], dtype=torch.int64, device=inp.device)


@op("Size")
def size(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return torch.tensor(x[0].numel(), dtype=torch.int64, device=x[0].device)


@op("Gather")
def gather(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp, idx = x[0], x[1]
    assert inp is not None and idx is not None
    axis = _axis(int(a.get("axis", 0)), inp.dim())
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + inp.shape[axis], idx)
    out = inp.index_select(axis, idx.reshape(-1))
    return out.reshape(*inp.shape[:axis], *idx.shape, *inp.shape[axis + 1 :])


@op("Slice")
def slice_(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    if opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = a.get("axes"), None
    else:
        starts, ends = _ints(x[1]) or [], _ints(x[2]) or []
        axes = _ints(x[3]) if len(x) > 3 else None
        steps = _ints(x[4]) if len(x) > 4 else None
    axes = list(range(len(starts))) if axes is None else [_axis(int(v), inp.dim()) for v in axes]
    steps = steps or [1] * len(starts)
    index: list[slice] = [slice(None)] * inp.dim()
    flips: list[int] = []
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        lo, hi, step = slice(s, e, st).indices(inp.shape[ax])
        if step > 0:
            index[ax] = slice(lo, max(lo, hi), step)
        else:  # torch has no negative steps: take the positions in order, then flip
            picked = list(range(lo, hi, step))
            if picked:
                index[ax] = slice(picked[-1], picked[0] + 1, -step)
                flips.append(ax)
            else:
                index[ax] = slice(0, 0)
    out = inp[tuple(index)]
    return out.flip(flips) if flips else out


@op("Expand")
def expand(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    target = _ints(x[1]) or []
    # ONNX Expand broadcasts both ways (a target dim of 1 keeps the input's dim)
    return inp.expand(torch.broadcast_shapes(tuple(inp.shape), tuple(target)))


@op("Tile")
def tile(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return x[0].repeat(_ints(x[1]) or [])


@op("Cast")
def cast(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    return x[0].to(TORCH_DTYPE[int(a["to"])])


@op("CastLike")
def cast_like(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None and x[1] is not None
    return x[0].to(x[1].dtype)


@op("Pad")
def pad(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    mode = a.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if opset < 11:
        pads, value, axes = list(a["pads"]), float(a.get("value", 0.0)), None
    else:
        pads = _ints(x[1]) or []
        cv = x[2] if len(x) > 2 else None
        value = float(cv.reshape(-1)[0]) if cv is not None and cv.numel() else 0.0
        axes = _ints(x[3]) if len(x) > 3 else None
    rank = inp.dim()
    axes = list(range(rank)) if axes is None else [_axis(v, rank) for v in axes]
    full = [0] * (2 * rank)
    k = len(axes)
    for i, ax in enumerate(axes):
        full[ax], full[rank + ax] = pads[i], pads[k + i]
    tp = _torch_pad(full)
    # F.pad pads from the last dim; drop the leading all-zero pairs it need not see
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]
    if mode == "constant":
        return F.pad(inp, tp, value=value)
    return F.pad(inp, tp, mode={"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode])


@op("Constant")
def constant(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Never run: the executor turns Constant nodes into buffers when it builds the module."""
    raise AssertionError("Constant nodes are folded at construction")


@op("ConstantOfShape")
def constant_of_shape(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    assert x[0] is not None
    value = a.get("value")
    dims = _ints(x[0]) or []
    if value is None:
        return torch.zeros(dims, dtype=torch.float32, device=x[0].device)
    return value.to(x[0].device).reshape(-1)[0].expand(dims).clone()


@op("Range")
def range_(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    start, limit, delta = x[:3]
    assert start is not None and limit is not None and delta is not None
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


# ------------------------------------------------------------------------------------------------------------
# quantisation


def _per_axis(v: Tensor, rank: int, axis: int) -> Tensor:
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return v.reshape(shape)


@op("DequantizeLinear")
def dequantize_linear(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    q, scale = x[0], x[1]
    zp = x[2] if len(x) > 2 else None
    assert q is not None and scale is not None
    axis = _axis(int(a.get("axis", 1)), max(q.dim(), 1))
    s = _per_axis(scale, q.dim(), axis)
    v = q.to(scale.dtype)
    if zp is not None:
        v = v - _per_axis(zp, q.dim(), axis).to(scale.dtype)
    return v * s


_QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767)}


@op("QuantizeLinear")
def quantize_linear(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    v, scale = x[0], x[1]
    zp = x[2] if len(x) > 2 else None
    assert v is not None and scale is not None
    axis = _axis(int(a.get("axis", 1)), max(v.dim(), 1))
    dtype = zp.dtype if zp is not None else TORCH_DTYPE[int(a.get("output_dtype", 0)) or TensorProto.UINT8]
    lo, hi = _QRANGE[dtype]
    q = torch.round(v / _per_axis(scale, v.dim(), axis))  # round half to even, as the spec says
    if zp is not None:
        q = q + _per_axis(zp, v.dim(), axis).to(q.dtype)
    return torch.clamp(q, lo, hi).to(dtype)


# Attributes whose values the executor cannot honour: (op, check) -> reason when the check fails.
def unsupported_reason(op_type: str, attrs: dict[str, Any], n_outputs: int) -> str | None:
    """Why a node with these attributes cannot be run (None when it can)."""
    if op_type in ("MaxPool",) and n_outputs > 1:
        return "MaxPool with an Indices output"
    if op_type == "AveragePool" and any(d != 1 for d in attrs.get("dilations", [])):
        return "AveragePool with dilations"
    if op_type in ("DequantizeLinear", "QuantizeLinear") and attrs.get("block_size", 0):
        return f"{op_type} with block_size"
    if op_type == "BatchNormalization" and (attrs.get("training_mode", 0) or n_outputs > 1):
        return "BatchNormalization in training mode"
    if op_type == "Pad" and attrs.get("mode", "constant") not in ("constant", "reflect", "edge", "wrap"):
        return f"Pad mode {attrs['mode']!r}"
    return None
