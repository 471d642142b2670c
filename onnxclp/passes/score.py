"""Score every channel of every scored layer (ALGORITHMS.md sections 2 and 3).

The score of channel k is ``|scale_k| * norm(W_k)``, with ``scale_k`` the paired affine's per-channel scale
(BatchNormalization ``gamma / sqrt(var + eps)``, or the Mul constant) and, for a Gemm, ``|alpha|``. Weights are
read one layer at a time and dropped after scoring, so memory stays near one layer's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxclp import scores as S
from onnxclp import weights
from onnxclp.errors import OnnxclpError
from onnxclp.graph import GraphIndex
from onnxclp.io import TensorStore
from onnxclp.layers import Layer, Skip, attr


@dataclass
class ScoredLayer:
    """A layer with one score per output channel."""

    layer: Layer
    scores: np.ndarray
    kind: str
    note: str | None = None


def affine_scale(layer: Layer, index: GraphIndex, store: TensorStore) -> np.ndarray | None:
    """The paired affine's per-channel scale, or None when the layer has no affine."""
    aff = layer.affine
    if aff is None or aff.scale is None:
        return None
    scale = weights.read(index, store, aff.scale.src).astype(np.float64).reshape(-1)
    if aff.kind == "BatchNormalization":
        var = weights.read(index, store, aff.var.src).astype(np.float64).reshape(-1)
        if not np.all(var + aff.epsilon > 0):  # also catches NaN: the division below would warn and give inf/NaN
            raise OnnxclpError(f"layer {layer.key!r}: its BatchNormalization has variance + epsilon <= 0 or NaN")
        scale = scale / np.sqrt(var + aff.epsilon)
    return scale


def _input_sizes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Spatial sizes of every tensor whose shape onnx's shape inference can determine.

    Without data propagation: on a hostile model (a value_info declaring 2**40 elements) onnx's data
    propagation allocates memory until it fails (10 GB and a minute, measured with onnx 1.23).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
    except Exception:  # shape inference is best effort here: layers without a size are skipped
        return {}
    sizes: dict[str, tuple[int, ...]] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 3 and all(d.HasField("dim_value") for d in dims[2:]):
            sizes[vi.name] = tuple(int(d.dim_value) for d in dims[2:])
    return sizes


# The exact score builds a (C_in, *input size) complex grid per channel: refuse sizes past ~1 GiB of it.
_EXACT_MAX_ELEMS = 2**26


def _exact(layer: Layer, w: np.ndarray, sizes: dict[str, tuple[int, ...]]) -> np.ndarray | str:
    if layer.is_fc:
        return S.spectral(w)  # an FC row's operator norm is its L2 norm: exact already
    size = sizes.get(layer.input_name)
    if size is None:
        return "exact score needs the layer's input size, which shape inference could not determine"
    nd = w.ndim - 2
    strides = tuple(attr(layer.node, "strides", [1] * nd))
    dilations = tuple(attr(layer.node, "dilations", [1] * nd))
    if len(strides) != nd or len(dilations) != nd or min((*strides, *dilations), default=1) < 1:
        raise OnnxclpError(
            f"layer {layer.key!r}: strides {list(strides)} and dilations {list(dilations)} do not fit a {nd}-D kernel"
        )
    if len(size) != nd or min(size, default=1) < 1:
        return f"exact score: shape inference gives the input spatial size {list(size)}, the kernel is {nd}-D"
    if w.shape[1] * int(np.prod(size, dtype=object)) > _EXACT_MAX_ELEMS:
        return f"exact score: an input of {w.shape[1]} x {list(size)} is too large for the DFT of one channel"
    if layer.op == "ConvTranspose":
        return S.exact_transposed(w, size, strides, dilations)
    if any(n % s for n, s in zip(size, strides, strict=True)):
        return f"exact score needs an input size {list(size)} divisible by the strides {list(strides)}"
    return S.exact(w, size, strides, dilations)


def _float64(layer: Layer, c: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Channels ``lo:hi`` of the canonical weight in float64, refused if any is NaN or Inf."""
    part = c[lo:hi].astype(np.float64)
    if not np.all(np.isfinite(part)):
        raise OnnxclpError(f"layer {layer.key!r}: weight {layer.weight.tensor.name!r} contains NaN or Inf")
    return part


def score_layers(
    model: onnx.ModelProto, index: GraphIndex, layers: list[Layer], store: TensorStore, kind: str
) -> tuple[list[ScoredLayer], list[Skip]]:
    """Scores for each layer with the ``spectral``, ``l2`` or ``exact`` score."""
    if kind not in ("spectral", "l2", "exact"):
        raise OnnxclpError(f"unknown score {kind!r}: choose spectral, l2 or exact")
    sizes = _input_sizes(model) if kind == "exact" else {}
    scored: list[ScoredLayer] = []
    skipped: list[Skip] = []
    for layer in layers:
        w = (
            store.read(layer.weight.tensor, writable=False)
            if layer.weight.plain
            else weights.read(index, store, layer.weight)
        )
        if tuple(w.shape) != layer.weight_shape:
            raise OnnxclpError(f"layer {layer.key!r}: weight shape {list(w.shape)} differs from its dims")
        c = layer.layout.to_channels(w)  # a view of w, except for ConvTranspose
        if kind == "exact":
            s = _exact(layer, _float64(layer, c, 0, c.shape[0]), sizes)
            if isinstance(s, str):
                skipped.append(Skip(layer.key, layer.op, s, layer.weight.tensor.name))
                continue
        else:
            # A few channels at a time in float64: a large weight is never copied whole.
            step = max(1, S._CHUNK_ELEMS // max(1, c[:1].size))
            s = np.concatenate(
                [S.SCORERS[kind](_float64(layer, c, lo, lo + step)) for lo in range(0, c.shape[0], step)]
            )
        del w, c  # before the next layer's weight is read
        scale = affine_scale(layer, index, store)
        if scale is not None and not np.all(np.isfinite(scale)):
            raise OnnxclpError(f"layer {layer.key!r}: its {layer.affine.kind} has NaN or Inf parameters")
        s = S.apply_scale(s, scale)
        if layer.op == "Gemm":
            s = s * abs(float(attr(layer.node, "alpha", 1.0)))
        if not np.all(np.isfinite(s)):  # float64 weights near their limit: a norm overflows
            raise OnnxclpError(f"layer {layer.key!r}: channel scores overflow (weights or scales too large)")
        scored.append(ScoredLayer(layer, s, kind))
    return scored, skipped
