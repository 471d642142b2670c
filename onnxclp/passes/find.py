"""Index the graph and find its scored layers (:func:`onnxclp.layers.find_layers`); layers that cannot be scored,
and scored-op nodes inside subgraphs or functions, are recorded as skipped with the reason."""

from __future__ import annotations

from onnxclp.graph import GraphIndex
from onnxclp.layers import find_layers, find_nested
from onnxclp.pipeline import PassResult, State


def run(state: State) -> PassResult:
    state.index = GraphIndex(state.model.graph)
    found = find_layers(state.index, state.store)
    state.found = list(found.layers)
    state.layers = list(found.layers)
    state.skipped = [*state.skipped, *found.skipped, *find_nested(state.model)]
    return PassResult(len(state.layers))
