"""Adding a node after a tensor, for the repairs that add nodes (NPD's polarizer, AC's bounds): fresh names, every
reader of the tensor (nested graphs and graph outputs included) rewired to the new node's output, the node placed
right after the tensor's producer, and the model's ``onnxclp.added_nodes`` metadata extended."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

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
