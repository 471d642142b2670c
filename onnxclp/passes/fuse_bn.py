"""Fold each paired BatchNormalization into the Conv, ConvTranspose or Gemm before it.

``s = gamma / sqrt(var + eps)``; ``W'_k = s_k W_k``; ``b'_k = s_k (b_k - mean_k) + beta_k``. The layer takes
over the BatchNormalization's output name, so every reader and value_info of that name is unchanged; the
BatchNormalization node is removed, and its constants too when nothing else reads them (never a graph input:
the model's interface is kept). An Identity or inference Dropout between the layer and the BatchNormalization
stays, and it is that node which takes over the name. A per-channel Mul/Add after the BatchNormalization
(Caffe2) is left in place. In a model of IR version 3 the new bias is declared a graph input too, as that IR
version requires of every initializer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxclp import weights
from onnxclp.edit import Editor
from onnxclp.errors import OnnxclpError
from onnxclp.graph import GraphIndex
from onnxclp.layers import Layer, attr, find_layers
from onnxclp.tensors import TensorStore, cast_checked

if TYPE_CHECKING:
    from onnxclp.pipeline import PassResult, State


def _bn_scale(layer: Layer, index: GraphIndex, store: TensorStore) -> tuple[np.ndarray, np.ndarray]:
    aff = layer.affine
    gamma, beta, mean, var = (
        weights.read(index, store, pc.src).astype(np.float64).reshape(-1)
        for pc in (aff.scale, aff.shift, aff.mean, aff.var)
    )
    if not all(np.all(np.isfinite(x)) for x in (gamma, beta, mean, var)):
        raise OnnxclpError(f"layer {layer.key!r}: its BatchNormalization has NaN or Inf parameters")
    if not np.all(var + aff.epsilon > 0):  # the division below would warn and give inf/NaN
        raise OnnxclpError(f"layer {layer.key!r}: its BatchNormalization has variance + epsilon <= 0")
    s = gamma / np.sqrt(var + aff.epsilon)
    return s, beta - s * mean


def fuse_batchnorm(model: onnx.ModelProto, store: TensorStore) -> int:
    """Fold every paired BatchNormalization of the main graph; returns how many were folded."""
    index = GraphIndex.of(model)
    editor = Editor(index, store)
    layers = [
        layer
        for layer in find_layers(index, store).layers
        if layer.affine is not None and layer.affine.kind == "BatchNormalization" and layer.op != "MatMul"
    ]
    removed: list[onnx.NodeProto] = []
    for layer in layers:
        node = layer.node
        beta_attr = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if beta_attr == 0.0:
            continue
        s, shift = _bn_scale(layer, index, store)
        editor.rescale_channels(layer, {k: float(v) for k, v in enumerate(s)})
        if layer.bias is not None:
            b = weights.read(index, store, layer.bias.src).astype(np.float64)
            new_b = (s.reshape(b.shape) * beta_attr * b + shift.reshape(b.shape)) / beta_attr
            editor.write_constant(layer.bias.src, layer.bias.node, layer.bias.input_index, new_b)
        else:
            dtype = weights.read(index, store, layer.weight).dtype
            name = editor.unique_name(f"{layer.key}.bias")
            value = cast_checked(shift / beta_attr, dtype, f"layer {layer.key!r}: folded BatchNormalization bias")
            index.add_initializer(onnx.numpy_helper.from_array(value, name))
            while len(node.input) < 2:
                node.input.append("")
            if len(node.input) == 2:
                node.input.append(name)
            else:
                node.input[2] = name
        bn = layer.affine.nodes[0]
        writer = layer.affine.via[-1] if layer.affine.via else node  # the node whose output the BN read
        old_out = writer.output[0]
        writer.output[0] = bn.output[0]
        removed.append(bn)
        kept_vi = [vi for vi in model.graph.value_info if vi.name != old_out]
        if len(kept_vi) != len(model.graph.value_info):
            del model.graph.value_info[:]
            model.graph.value_info.extend(kept_vi)
    if not removed:
        return 0
    gone = {id(n) for n in removed}
    nodes = [n for n in model.graph.node if id(n) not in gone]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model, {x for n in removed for x in n.input[1:]})
    return len(removed)


def _drop_unused_initializers(model: onnx.ModelProto, candidates: set[str]) -> None:
    """Remove initializers among ``candidates`` that nothing reads any more (never graph inputs)."""
    index = GraphIndex.of(model)
    unused = {
        name
        for name in candidates
        if name in index.initializers
        and not index.consumers.get(name)
        and name not in index.graph_outputs
        and name not in index.graph_inputs
    }
    if not unused:
        return
    kept = [t for t in model.graph.initializer if t.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def run(state: State) -> PassResult:
    """Pipeline pass: with ``--fuse-bn``, fold every paired BatchNormalization (refused when the method or its
    score reads BatchNorm statistics: folding would erase them before they are read)."""
    from onnxclp import scoring
    from onnxclp.pipeline import PassResult

    if not state.options.fuse_bn:
        return PassResult()
    readers = [f"method {state.method.name!r}"] if getattr(state.method, "needs_batchnorm", False) else []
    if state.params.score and scoring.get(state.params.score).needs_batchnorm:
        readers.append(f"score {state.params.score!r}")
    if readers:
        raise OnnxclpError(
            f"--fuse-bn folds the BatchNorm statistics that {' and '.join(readers)} reads: drop --fuse-bn"
        )
    state.fused_batchnorms = fuse_batchnorm(state.model, state.store)
    return PassResult(state.fused_batchnorms)
