"""Adding a node after a tensor, for the repairs that add nodes (NPD's polarizer, AC's bounds): fresh names, every
reader of the tensor (nested graphs and graph outputs included) rewired to the new node's output, the node placed
right after the tensor's producer, and the model's ``onnxclp.added_nodes`` metadata extended."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    import numpy as np
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


def file_dtype(model: onnx.ModelProto, tensor: str) -> np.dtype | None:
    """The element type ``tensor`` has in the file, as a numpy dtype: from the graph's declarations (inputs,
    outputs, value_info), else from onnx's type inference on the model; None when neither says. The torch bridge
    computes half-precision graphs in float32 (:mod:`onnxclp.bridge`), so a value written into such a graph must
    take the file's type, not the one it was trained in."""
    import onnx
    from onnx import helper

    def declared(graph: onnx.GraphProto) -> int:
        for vi in (*graph.input, *graph.output, *graph.value_info):
            if vi.name == tensor and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                return int(vi.type.tensor_type.elem_type)
        return 0

    elem = declared(model.graph)
    if not elem:
        try:
            elem = declared(onnx.shape_inference.infer_shapes(model).graph)
        except Exception:  # inference is a convenience here: None sends the caller to its own type
            return None
    return helper.tensor_dtype_to_np_dtype(elem) if elem else None


def as_file_dtype(model: onnx.ModelProto, tensor: str, values: np.ndarray, what: str) -> np.ndarray:
    """``values`` in the element type ``tensor`` has in the file (:func:`file_dtype`; unchanged when it is not
    known); an error naming ``what`` when a value does not fit that type (a float16 graph's range ends at 65504)."""
    import numpy as np

    dtype = file_dtype(model, tensor)
    if dtype is None or dtype == values.dtype:
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(dtype)
    if np.issubdtype(dtype, np.floating) and not np.isfinite(out).all() and np.isfinite(values).all():
        raise OnnxclpError(f"{what}: its values do not fit the graph's {dtype} (largest {np.abs(values).max():g})", 3)
    return out


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
