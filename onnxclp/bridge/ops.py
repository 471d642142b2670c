"""Torch implementations of the ONNX operators that CNN classifiers use, one function per operator.

Each function takes the node's inputs (torch tensors, ``None`` for an omitted optional input), its attributes
(a plain dict, already decoded) and the model's default-domain opset, and returns one tensor or a tuple of
tensors (the node's outputs in order). Semantics follow the ONNX operator specification
(https://onnx.ai/onnx/operators/), including the forms that changed between opsets: attributes that became
inputs (Reshape 5, Tile 6, Slice 10, Clip/Pad 11, Squeeze/Unsqueeze/Split/ReduceSum 13, the other Reduce* 18,
Upsample 9), the opt-in ``broadcast``/``axis`` of the binary ops before 7, BatchNormalization's ``spatial``
before 9, Softmax's 2-D coercion before 13, Dropout's mask type, Concat-1's default axis, Pad-1's
``paddings``, Cast-1's type names and PRelu's per-channel slope before 7. Integer tensors
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


# The bridge computes half-precision graphs in float32 (onnxclp.bridge, "Half precision"): a Cast to one of these
# gives float32, and float16/bfloat16 initializers and constants are read as float32.
HALF = (torch.float16, torch.bfloat16)


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
    """Inference form (running statistics), every version.

    Before opset 9 the ``spatial`` attribute (default 1) chose per-channel statistics (shape (C)); with
    ``spatial=0`` they are per activation, shaped like one sample (C, D1, ...). ``is_test``,
    ``consumed_inputs`` (BatchNormalization-1/6) and ``momentum`` do not change the inference output.
    """
    inp, scale, bias, mean, var = x[:5]
    assert inp is not None and scale is not None and bias is not None and mean is not None and var is not None
    eps = float(a.get("epsilon", 1e-5))
    spatial = opset >= 9 or bool(a.get("spatial", 1))
    if spatial and not (mean.requires_grad or var.requires_grad):
        return F.batch_norm(inp, mean, var, scale, bias, training=False, eps=eps)
    # Per-activation statistics, or statistics computed from parameters (a Cast of a float16 initializer):
    # F.batch_norm cannot differentiate with respect to running statistics, so the formula is written out.
    shape = (1, *inp.shape[1:]) if not spatial else (1, -1, *([1] * (inp.dim() - 2)))
    inv = torch.rsqrt(var.reshape(shape) + eps)
    return (inp - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


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
    """Inference: the input unchanged, and a mask for a second output.

    Every version is run as inference: ``is_test`` (Dropout-1/6), ``ratio`` (attribute before 12, input from
    12) and ``training_mode`` (input from 12) are not read, as onnxruntime's inference session does. The
    mask has the input's type before Dropout-10 (``T``) and is boolean from 10 on (``T1``). Before Dropout-12
    the spec leaves it unfilled outside training: zeros (false) here, as onnxruntime writes; from 12 on it is
    all true (nothing dropped), the spec's reference.
    """
    inp = x[0]
    assert inp is not None
    if opset >= 12:
        return inp, torch.ones_like(inp, dtype=torch.bool)
    return inp, torch.zeros_like(inp, dtype=torch.bool if opset >= 10 else inp.dtype)


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
    """From PRelu-7 the slope broadcasts unidirectionally (numpy); before, a 1-D slope of C values is per channel."""
    inp, slope = x[0], x[1]
    assert inp is not None and slope is not None
    if opset < 7 and slope.dim() == 1 and inp.dim() > 2 and slope.numel() == inp.shape[1] > 1:
        slope = slope.reshape(-1, *([1] * (inp.dim() - 2)))
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


def _legacy_broadcast(p: Tensor | None, q: Tensor | None, a: dict[str, Any], opset: int) -> tuple[Tensor, Tensor]:
    """The operands of a binary op, ``q`` aligned to ``p`` as the op's opset defines.

    Before opset 7 (Add/Sub/Mul/Div/Pow/comparisons/And/Or versions 1 and 6) broadcasting was opt-in:
    ``broadcast=1`` lets ``B`` be broadcast onto ``A``, aligned at ``axis`` when given (``A`` (2, 3, 4, 5) with
    ``B`` (3, 4) and ``axis=1`` reads ``B`` as (1, 3, 4, 1)) and at the trailing dimensions (numpy's rule) when
    not. From opset 7 on both operands broadcast multidirectionally (numpy), which torch does itself.
    """
    assert p is not None and q is not None
    if opset < 7 and a.get("broadcast", 0) and "axis" in a and q.dim() < p.dim():
        axis = _axis(int(a["axis"]), p.dim())
        q = q.reshape(*q.shape, *([1] * (p.dim() - axis - q.dim())))
    return p, q


def _div(p: Tensor, q: Tensor) -> Tensor:
    if p.dtype.is_floating_point or q.dtype.is_floating_point:
        return p / q
    return torch.div(p, q, rounding_mode="trunc")  # integer Div truncates (as C does)


@op("Mod")
def mod(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Mod-10/13: ``fmod=0`` takes the divisor's sign (Python's ``%``, integers only), ``fmod=1`` the dividend's (C's
    ``fmod``; required for floating point). nn.MultiheadAttention's export computes head indices with it."""
    assert x[0] is not None and x[1] is not None
    return torch.fmod(x[0], x[1]) if int(a.get("fmod", 0)) else torch.remainder(x[0], x[1])


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
    OPS[_name] = (lambda f: lambda x, a, opset: f(*_legacy_broadcast(x[0], x[1], a, opset)))(_fn2)


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


@op("LRN")
def lrn(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Local response normalisation across channels (LRN-1/13).

    ``square_sum[n, c, ...] = sum(X[n, i, ...] ** 2)`` for ``max(0, c - floor((size - 1) / 2)) <= i <=
    min(C - 1, c + ceil((size - 1) / 2))`` and ``Y = X / (bias + alpha / size * square_sum) ** beta``.
    (``F.local_response_norm`` centres an even window the other way, so the sum is computed here.)
    """
    inp = x[0]
    assert inp is not None
    size = int(a["size"])
    alpha, beta, bias = float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
    sq = (inp * inp).reshape(inp.shape[0], 1, inp.shape[1], -1)
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size // 2))  # floor((size-1)/2) before, ceil((size-1)/2) after
    square_sum = F.avg_pool2d(sq, (size, 1), stride=1) * size
    return inp / (bias + alpha / size * square_sum.reshape(inp.shape)) ** beta


# ------------------------------------------------------------------------------------------------------------
# resampling: Upsample (7-9; deprecated in 10) and Resize (10+), nearest and (multi)linear


def _source_coords(out: int, inp: int, scale: float, mode: str) -> Tensor:
    """Input coordinate (float32, as onnxruntime computes it) of each output index along one axis.

    ``mode`` is Resize's ``coordinate_transformation_mode`` (Resize-11 onwards; Upsample and Resize-10 are
    ``asymmetric``): ``x_original = x_resized / scale`` for asymmetric, ``(x + 0.5) / scale - 0.5`` for
    half_pixel, and the spec's other forms.
    """
    i = torch.arange(out, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    if mode == "asymmetric":
        return i / s
    if mode == "half_pixel":
        return (i + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / s - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float32)
    if mode == "tf_half_pixel_for_nn":
        return (i + 0.5) / s
    if mode == "align_corners":
        return i * (inp - 1) / (out - 1) if out > 1 else torch.zeros(out, dtype=torch.float32)
    if mode == "half_pixel_symmetric":
        offset = inp / 2 * (1 - out / (scale * inp))
        return offset + (i + 0.5) / s - 0.5
    raise ValueError(f"coordinate_transformation_mode {mode!r}")


_COORD_MODES = (
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "align_corners",
    "asymmetric",
    "half_pixel_symmetric",
)
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _nearest_index(coords: Tensor, inp: int, nearest_mode: str, downsampling: bool) -> Tensor:
    """The input index each output index copies, clamped into [0, inp - 1] (Resize's ``nearest_mode``).

    ``simple`` is Upsample's and Resize-10's rule (as onnxruntime implements it): floor when upsampling,
    ceil when downsampling.
    """
    if nearest_mode == "round_prefer_floor":
        idx = torch.where(coords - coords.floor() == 0.5, coords.floor(), coords.round())
    elif nearest_mode == "round_prefer_ceil":
        idx = torch.where(coords - coords.floor() == 0.5, coords.ceil(), coords.round())
    elif nearest_mode == "floor":
        idx = coords.floor()
    elif nearest_mode == "ceil":
        idx = coords.ceil()
    elif nearest_mode == "simple":
        idx = coords.ceil() if downsampling else coords.floor()
    else:
        raise ValueError(f"nearest_mode {nearest_mode!r}")
    return idx.clamp(0, inp - 1).to(torch.int64)


def _scaled_size(n: int, scale: float) -> int:
    """``floor(n * scale)``, the product in float32 as onnxruntime computes it."""
    return math.floor(float(torch.tensor(n, dtype=torch.float32) * torch.tensor(scale, dtype=torch.float32)))


def _resample(
    inp: Tensor, sizes: Sequence[int], scales: Sequence[float], mode: str, coord_mode: str, nearest_mode: str
) -> Tensor:
    """Resize ``inp`` axis by axis to ``sizes`` (``scales`` are the spec's per-axis scale factors).

    Nearest copies the chosen input element; linear interpolates between the two neighbours of the source
    coordinate, clamped into the input (the spec's edge padding), so N-D linear is the separable product of
    1-D ones (bilinear for 2 spatial axes). Both are gathers and weighted sums: differentiable in ``inp``.
    """
    y = inp
    for ax, (out, scale) in enumerate(zip(sizes, scales, strict=True)):
        n = inp.shape[ax]
        if out == n and scale == 1.0:
            continue
        coords = _source_coords(out, n, scale, coord_mode)
        if mode == "nearest":
            y = y.index_select(ax, _nearest_index(coords, n, nearest_mode, scale < 1).to(y.device))
            continue
        c = coords.clamp(0, n - 1)
        lo = c.floor().to(torch.int64)
        hi = (lo + 1).clamp(max=n - 1)
        shape = [1] * y.dim()
        shape[ax] = out
        w = (c - lo.to(c.dtype)).reshape(shape).to(device=y.device, dtype=y.dtype)
        y = y.index_select(ax, lo.to(y.device)) * (1 - w) + y.index_select(ax, hi.to(y.device)) * w
    return y


@op("Upsample")
def upsample(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Upsample-7 (``scales`` attribute), -9 and -10 (``scales`` input): ``floor(in * scale)`` per axis,
    asymmetric coordinates, mode ``nearest`` (default) or ``linear`` (Upsample-1 is refused by the check)."""
    inp = x[0]
    assert inp is not None
    if opset < 9:
        scales = [float(v) for v in a["scales"]]
    else:
        assert x[1] is not None
        scales = [float(v) for v in x[1].reshape(-1).tolist()]
    sizes = [_scaled_size(d, s) for d, s in zip(inp.shape, scales, strict=True)]
    return _resample(inp, sizes, scales, a.get("mode", "nearest"), "asymmetric", "simple")


@op("Resize")
def resize(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Resize-10 (like Upsample-9) and Resize-11/13/18/19 with modes nearest and linear.

    Inputs ``X, roi, scales, sizes`` (from 11; ``roi`` only matters for tf_crop_and_resize, refused); exactly
    one of ``scales`` / ``sizes`` is given (an empty tensor counts as absent). With scales, the output size is
    ``floor(in * scale)``; with sizes, the scale is ``out / in``. ``axes`` (18) restricts both to those axes.
    """
    inp = x[0]
    assert inp is not None
    rank = inp.dim()
    mode = a.get("mode", "nearest")
    if opset < 11:
        assert x[1] is not None
        scales_in: list[float] | None = [float(v) for v in x[1].reshape(-1).tolist()]
        sizes_in: list[int] | None = None
        coord_mode, nearest_mode = "asymmetric", "simple"
    else:
        sc = x[2] if len(x) > 2 else None
        sz = x[3] if len(x) > 3 else None
        scales_in = [float(v) for v in sc.reshape(-1).tolist()] if sc is not None and sc.numel() else None
        sizes_in = _ints(sz) if sz is not None and sz.numel() else None
        coord_mode = a.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = a.get("nearest_mode", "round_prefer_floor")
    axes = [_axis(int(v), rank) for v in a["axes"]] if "axes" in a else list(range(rank))
    sizes, scales = list(inp.shape), [1.0] * rank
    for i, ax in enumerate(axes):
        if sizes_in is not None:
            sizes[ax] = sizes_in[i]
            scales[ax] = float(torch.tensor(sizes_in[i], dtype=torch.float32) / inp.shape[ax])
        elif scales_in is not None:
            scales[ax] = scales_in[i]
            sizes[ax] = _scaled_size(inp.shape[ax], scales_in[i])
        else:
            raise ValueError("Resize needs scales or sizes")
    return _resample(inp, sizes, scales, mode, coord_mode, nearest_mode)


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
    """Concat-1 has an optional ``axis`` (default 1); from Concat-4 on it is required."""
    vals = [t for t in x if t is not None]
    return torch.cat(vals, dim=_axis(int(a.get("axis", 1)), vals[0].dim()))


@op("Split")
def split(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    inp = x[0]
    assert inp is not None
    axis = _axis(int(a.get("axis", 0)), inp.dim())
    from_input = opset >= 13 or (opset < 2 and "split" not in a)  # Split-1 took them as attribute or input
    sizes = (_ints(x[1]) if len(x) > 1 else None) if from_input else a.get("split")
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
    return out.reshape([*inp.shape[:axis], *idx.shape, *inp.shape[axis + 1 :]])  # a list: () is a valid shape


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
    """Tile-1 takes scalar ``tiles`` and ``axis`` inputs (one axis); from Tile-6 on ``repeats`` per axis."""
    inp = x[0]
    assert inp is not None
    if opset < 6:
        repeats = [1] * inp.dim()
        repeats[_axis(int((_ints(x[2]) or [0])[0]), inp.dim())] = int((_ints(x[1]) or [1])[0])
        return inp.repeat(repeats)
    return inp.repeat(_ints(x[1]) or [])


@op("Cast")
def cast(x: list[Tensor | None], a: dict[str, Any], opset: int) -> OpResult:
    """Cast-1 names the target type as a string (``"FLOAT"``); from Cast-6 on it is a TensorProto enum."""
    assert x[0] is not None
    to = a["to"]
    dtype = TORCH_DTYPE[TensorProto.DataType.Value(to.upper()) if isinstance(to, str) else int(to)]
    return x[0].to(torch.float32 if dtype in HALF else dtype)  # half precision is computed in float32


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
        # Pad-1 calls the attribute ``paddings``; Pad-2 to Pad-10 ``pads``
        pads, value, axes = list(a["pads"] if "pads" in a else a["paddings"]), float(a.get("value", 0.0)), None
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
    y = v / _per_axis(scale, v.dim(), axis)
    q = torch.round(y)  # round half to even, then add the zero point, as the spec says
    if zp is not None:
        q = q + _per_axis(zp, v.dim(), axis).to(q.dtype)
    q = torch.clamp(q, lo, hi)
    if not v.requires_grad:
        return q.to(dtype)
    # Training through a quantised activation (docs/bridge.md, "Quantized weights"): the same integers, as floats,
    # with the straight-through gradient inside the range (zero where clipped).
    if zp is not None:
        y = y + _per_axis(zp, v.dim(), axis).to(y.dtype)
    y = torch.clamp(y, lo, hi)
    return y + (q - y).detach()


# Attributes whose values the executor cannot honour: (op, check) -> reason when the check fails.
def unsupported_reason(op_type: str, attrs: dict[str, Any], n_outputs: int, opset: int = 21) -> str | None:
    """Why a node with these attributes, at this default-domain opset, cannot be run (None when it can)."""
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
    if op_type == "Upsample" and opset < 7:
        return "experimental Upsample-1"
    if op_type in ("Upsample", "Resize") and attrs.get("mode", "nearest") not in ("nearest", "linear"):
        return f"{op_type} mode {attrs['mode']!r}"
    if op_type == "Resize":
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        if coord not in _COORD_MODES:
            return f"Resize coordinate_transformation_mode {coord!r}"
        if attrs.get("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
            return f"Resize nearest_mode {attrs['nearest_mode']!r}"
        if attrs.get("antialias", 0):
            return "Resize with antialias"
        if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return f"Resize keep_aspect_ratio_policy {attrs['keep_aspect_ratio_policy']!r}"
    return None
