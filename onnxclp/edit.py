"""Applying decisions to tensors: zero, rescale, top-k. Nothing here decides anything.

Only the tensors that must change are touched, and each is written back in its own dtype. A constant that
another node (or a subgraph, or a graph output) also reads is copied first into a new initializer that only
the edited node reads, so the other users keep the original value (copy-on-write). In a model of IR version 3,
where every initializer must be a graph input, such a copy is declared a graph input too
(:meth:`onnxclp.graph.GraphIndex.add_initializer`). An initializer that is also a graph input is edited in place
like any other: it stays a graph input, so the model's interface does not change.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import NodeProto, TensorProto

from onnxclp import weights
from onnxclp.graph import ConstSource, GraphIndex
from onnxclp.layers import Layer, PerChannel
from onnxclp.tensors import TensorStore, cast_checked


class Editor:
    """Edits the constants of one graph in place, copying shared ones first."""

    def __init__(self, index: GraphIndex, store: TensorStore) -> None:
        self.index = index
        self.store = store
        self.copies: list[str] = []  # names of initializers created by copy-on-write
        self.touched: set[str] = set()
        self._names: set[str] | None = None

    def unique_name(self, base: str) -> str:
        """A tensor name not yet used in the graph, derived from ``base``."""
        if self._names is None:
            g = self.index.graph
            names = set(self.index.initializers) | set(self.index.producer) | self.index.graph_inputs
            names |= {o.name for o in g.output}
            self._names = names
        name, i = f"{base}_onnxclp", 1
        while name in self._names:
            i += 1
            name = f"{base}_onnxclp{i}"
        self._names.add(name)
        return name

    def writable(self, src: ConstSource, node: NodeProto, input_index: int) -> TensorProto:
        """The tensor to write for ``node.input[input_index]``: the original if only it reads it."""
        if self.index.uses(src) == 1:
            return src.tensor
        old = node.input[input_index]
        base = src.tensor.name or (src.node.output[0] if src.node is not None else old)
        copy = onnx.numpy_helper.from_array(self.store.read(src.tensor), self.unique_name(base))
        copy.data_type = src.tensor.data_type
        copy.doc_string = src.tensor.doc_string
        if self.store.size_hint is not None:
            self.store.size_hint += copy.ByteSize()
        new = self.index.add_initializer(copy)
        self._rewire(node, input_index, new.name)
        return new

    def write_constant(self, src: ConstSource, node: NodeProto, input_index: int, value: np.ndarray) -> None:
        """Make ``node.input[input_index]`` (a constant) read ``value``, in the stored tensor's own form.

        A plain constant is written in place, or copied first when shared. Through a chain of transforms
        (:mod:`onnxclp.weights`) the chain is inverted when only this node sees it; a shared chain is
        replaced, for this node only, by a new initializer holding the value the node reads.
        """
        if src.plain:
            tensor = self.writable(src, node, input_index)
            self.store.write(tensor, np.reshape(value, tuple(tensor.dims)))
            self.touched.add(tensor.name or node.input[input_index])
            return
        _, steps = weights.trace(self.index, self.store, src)
        if weights.exclusive(self.index, src, node):
            stored = weights.invert(self.index, self.store, steps, np.asarray(value), self)
            self.store.write(src.tensor, stored)
            self.touched.add(src.tensor.name or src.node.output[0])
            return
        old = node.input[input_index]
        copy = onnx.numpy_helper.from_array(np.ascontiguousarray(value), self.unique_name(old))
        self.index.add_initializer(copy)
        self._rewire(node, input_index, copy.name)

    def _rewire(self, node: NodeProto, input_index: int, new: str) -> None:
        """Point ``node.input[input_index]`` at the initializer ``new`` (already added), keeping the index true."""
        old = node.input[input_index]
        node.input[input_index] = new
        users = self.index.consumers.get(old, [])
        for i, user in enumerate(users):
            if user is node:
                del users[i]
                break
        self.index.consumers[new].append(node)
        self.copies.append(new)

    def _update(self, src: ConstSource, node: NodeProto, input_index: int, fn: Callable[[np.ndarray], None]):
        value = weights.read(self.index, self.store, src)
        fn(value)
        self.write_constant(src, node, input_index, value)

    def _per_channel(self, pc: PerChannel, channels: list[int], value: float) -> None:
        def fn(v: np.ndarray) -> None:
            v.reshape(-1)[channels] = value

        self._update(pc.src, pc.node, pc.input_index, fn)

    def _weight(self, layer: Layer, channels, fn: Callable[[np.ndarray], None]) -> None:
        """Apply ``fn`` to the rows ``channels`` of the canonical (K, C, ...) view of the layer's weight, in
        float64, and write them back. Only those rows are converted: a large weight is not copied whole."""
        idx = np.asarray(channels, dtype=np.int64)

        def on_stored(v: np.ndarray) -> None:
            c = layer.layout.to_channels(v)  # a view of v, except for ConvTranspose
            rows = c[idx].astype(np.float64)
            fn(rows)
            c[idx] = cast_checked(rows, v.dtype, f"layer {layer.key!r}")
            if not np.may_share_memory(c, v):
                v[...] = layer.layout.from_channels(c, v.shape)

        self._update(layer.weight, layer.node, layer.weight_index, on_stored)

    def zero_channels(self, layer: Layer, channels: list[int]) -> None:
        """Make each channel's output before the activation exactly 0 (docs/algorithms.md, "Editing").

        With a paired affine, its scale and shift are zeroed (BatchNormalization gamma and beta, or the Mul
        and Add constants), and the shifts of the per-channel Mul/Add that follow a BatchNormalization (Caffe2's
        scale layer); otherwise the kernel slices and the bias of the layer.
        """
        if not channels:
            return
        aff = layer.affine
        if aff is not None and aff.scale is not None:
            self._per_channel(aff.scale, channels, 0.0)
            if aff.shift is not None:
                self._per_channel(aff.shift, channels, 0.0)
            for shift in aff.tail_shifts:
                self._per_channel(shift, channels, 0.0)
            return

        def fn(rows: np.ndarray) -> None:
            rows[...] = 0.0

        self._weight(layer, channels, fn)
        if layer.bias is not None:
            self._per_channel(layer.bias, channels, 0.0)

    def rescale_channels(self, layer: Layer, factors: dict[int, float]) -> None:
        """Multiply kernel slices ``W_k`` by ``factors[k]``; biases and affines are left alone (LPP)."""
        if not factors:
            return
        idx = np.array(sorted(factors), dtype=np.int64)
        mult = np.array([factors[i] for i in idx.tolist()], dtype=np.float64)

        def fn(rows: np.ndarray) -> None:
            rows *= mult.reshape((-1,) + (1,) * (rows.ndim - 1))

        self._weight(layer, idx, fn)

    def zero_weights(self, layer: Layer, row: int, columns: list[int]) -> None:
        """Zero single weights ``W[row, columns]`` of an FC layer (LPP's classifier top-k step)."""
        if not columns:
            return

        def fn(rows: np.ndarray) -> None:
            rows[0, 0, columns] = 0.0

        self._weight(layer, [row], fn)
