"""Score every channel of every scored layer with a registered score (docs/algorithms.md, "Scores").

The score of channel k is ``|scale_k| * norm(W_k)``, with ``scale_k`` the paired affine's per-channel scale
(BatchNormalization ``gamma / sqrt(var + eps)``, or the Mul constant) and, for a Gemm, ``|alpha|``. Weights are
read one layer at a time and dropped after scoring, so memory stays near one layer's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxclp import scores as S
from onnxclp import scoring, weights
from onnxclp.errors import OnnxclpError
from onnxclp.graph import GraphIndex
from onnxclp.layers import Layer, attr
from onnxclp.pipeline import PassResult, State
from onnxclp.report import SkippedLayer
from onnxclp.scoring import BatchNormStats, LayerView
from onnxclp.tensors import TensorStore


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
    for tail in aff.tail_scales:  # a per-channel Mul after the BatchNormalization (Caffe2 exports)
        scale = scale * weights.read(index, store, tail.src).astype(np.float64).reshape(-1)
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


def _batchnorm(layer: Layer, index: GraphIndex, store: TensorStore) -> BatchNormStats | None:
    """The kept BatchNormalization's statistics, for the scores that declare they read them."""
    aff = layer.affine
    if aff is None or aff.kind != "BatchNormalization":
        return None
    gamma, beta, mean, var = (
        weights.read(index, store, pc.src).astype(np.float64).reshape(-1)
        for pc in (aff.scale, aff.shift, aff.mean, aff.var)
    )
    return BatchNormStats(gamma, beta, mean, var, float(aff.epsilon))


def score_layers(
    model: onnx.ModelProto, index: GraphIndex, layers: list[Layer], store: TensorStore, kind: str
) -> tuple[list[ScoredLayer], list[SkippedLayer]]:
    """Scores for each layer with the registered score ``kind`` (:mod:`onnxclp.scoring`), times the paired
    affine's ``|scale_k|`` and a Gemm's ``|alpha|``; a layer the score cannot handle is skipped with its reason."""
    score = scoring.get(kind)
    sizes = _input_sizes(model) if score.needs_input_size else {}
    scored: list[ScoredLayer] = []
    skipped: list[SkippedLayer] = []
    for layer in layers:
        w = (
            store.read(layer.weight.tensor, writable=False)
            if layer.weight.plain
            else weights.read(index, store, layer.weight)
        )
        if tuple(w.shape) != layer.weight_shape:
            raise OnnxclpError(f"layer {layer.key!r}: weight shape {list(w.shape)} differs from its dims")
        c = layer.layout.to_channels(w)  # a view of w, except for ConvTranspose
        nd = c.ndim - 2
        scale = affine_scale(layer, index, store)
        view = LayerView(
            key=layer.key,
            op=layer.op,
            weight_name=layer.weight.tensor.name,
            weight=c,
            is_fc=layer.is_fc,
            strides=tuple(attr(layer.node, "strides", [1] * nd)),
            dilations=tuple(attr(layer.node, "dilations", [1] * nd)),
            group=int(attr(layer.node, "group", 1)),
            scale=scale,
            batchnorm=_batchnorm(layer, index, store) if score.needs_batchnorm else None,
            input_size=sizes.get(layer.input_name),
        )
        s = score.compute(view)
        if isinstance(s, str):
            skipped.append(SkippedLayer(layer.key, layer.op, s, layer.weight.tensor.name))
            continue
        del w, c, view  # before the next layer's weight is read
        if scale is not None and not np.all(np.isfinite(scale)):
            raise OnnxclpError(f"layer {layer.key!r}: its {layer.affine.kind} has NaN or Inf parameters")
        s = S.apply_scale(s, scale)
        if layer.op == "Gemm":
            s = s * abs(float(attr(layer.node, "alpha", 1.0)))
        if not np.all(np.isfinite(s)):  # float64 weights near their limit: a norm overflows
            raise OnnxclpError(f"layer {layer.key!r}: channel scores overflow (weights or scales too large)")
        scored.append(ScoredLayer(layer, s, kind))
    return scored, skipped


def run(state: State) -> PassResult:
    """Pipeline pass: score the kept layers with the method's score (a method without a score skips it)."""
    if not state.params.score:
        return PassResult()
    assert state.index is not None
    state.scored, skipped = score_layers(state.model, state.index, state.layers, state.store, state.params.score)
    state.skipped.extend(skipped)
    return PassResult(len(state.scored))
