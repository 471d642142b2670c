"""Adding a node after a tensor, for the repairs that add nodes (NPD's polarizer, AC's bounds): fresh names, every
reader of the tensor (nested graphs and graph outputs included) rewired to the new node's output, the node placed
right after the tensor's producer, and the model's ``onnxclp.added_nodes`` metadata extended."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    import onnx

METADATA_KEY = "onnxclp.added_nodes"


def names_in(graph: onnx.GraphProto) -> set[str]:
    """Every node, tensor, initializer and value name of ``graph`` and of the graphs nested in its nodes."""
    out: set[str] = set()
    for n in graph.node:
        out.add(n.name)
        out.update(n.input)
        out.update(n.output)
        for a in n.attribute:
            for g in (a.g,) if a.HasField("g") else tuple(a.graphs):
                out |= names_in(g)
    out.update(t.name for t in graph.initializer)
    out.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
    return out


def unique(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``... the first not in ``taken`` (then added to it)."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def file_dtypes(model: onnx.ModelProto, tensors: Iterable[str]) -> dict[str, np.dtype]:
    """The element type each of ``tensors`` has in the file, as a numpy dtype: from the graph's declarations
    (inputs, outputs, value_info), else from one run of onnx's type inference on the model (without data
    propagation, as :mod:`onnxclp.passes.score` runs it); a tensor neither gives is left out. The torch bridge
    computes half-precision graphs in float32 (:mod:`onnxclp.bridge`), so a value written into such a graph must
    take the file's type, not the one it was trained in."""
    import onnx
    from onnx import helper

    def declared(graph: onnx.GraphProto, wanted: set[str]) -> dict[str, int]:
        return {vi.name: int(vi.type.tensor_type.elem_type) for vi in (*graph.input, *graph.output, *graph.value_info)
                if vi.name in wanted and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}  # fmt: skip

    wanted = set(tensors)
    elems = declared(model.graph, wanted)
    if wanted - set(elems):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=False)
            elems = {**declared(inferred.graph, wanted - set(elems)), **elems}
        except Exception:  # inference is a convenience here: a tensor left out keeps the caller's type
            pass
    return {name: np.dtype(helper.tensor_dtype_to_np_dtype(elem)) for name, elem in elems.items()}


def as_file_dtype(values: np.ndarray, dtype: np.dtype | None, what: str) -> np.ndarray:
    """``values`` in ``dtype`` (a tensor's type in the file, :func:`file_dtypes`; unchanged when None): the checked
    cast of :func:`onnxclp.tensors.cast_checked`, whose refusal (a float16 graph's range ends at 65504) is exit 3
    here: nothing this method wrote can go into the graph."""
    from onnxclp.tensors import cast_checked

    if dtype is None:
        return values
    try:
        return cast_checked(values, dtype, what, "values")
    except OnnxclpError as exc:
        raise OnnxclpError(exc.message, 3) from None


def rewire(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every node input named ``old`` (nested graphs included, which may read the outer scope) reads ``new``."""
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == old:
                n.input[i] = new
        for a in n.attribute:
            for g in (a.g,) if a.HasField("g") else tuple(a.graphs):
                rewire(g, old, new)


def insert_after(graph: onnx.GraphProto, tensor: str, node: onnx.NodeProto) -> None:
    """Put ``node`` (which reads ``tensor`` and writes ``node.output[0]``) right after ``tensor``'s producer; every
    former reader of ``tensor``, a graph output of that name too, reads ``node.output[0]`` instead."""
    rewire(graph, tensor, node.output[0])
    for o in graph.output:
        if o.name == tensor:
            o.name = node.output[0]
    producer = next((i for i, n in enumerate(graph.node) if tensor in n.output), -1)
    nodes = list(graph.node)
    nodes.insert(producer + 1, node)
    del graph.node[:]
    graph.node.extend(nodes)


def record_added(model: onnx.ModelProto, names: list[str]) -> None:
    """Extend the model's ``onnxclp.added_nodes`` metadata (a JSON list) with ``names``."""
    entries = {p.key: p for p in model.metadata_props}
    if METADATA_KEY in entries:
        listed = json.loads(entries[METADATA_KEY].value or "[]")
        entries[METADATA_KEY].value = json.dumps([*listed, *names])
    else:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(names))
