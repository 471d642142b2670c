"""Inline model-local functions, on request (``--inline-functions``), so that the layers inside them are scored.

Not in either paper. torch's ``export_modules_as_functions`` (and other exporters) put a block's
convolutions in a model-local function whose weights arrive as call arguments; the same function is called
once per block with different weights, so its body cannot be edited in place. Without this option such layers
are skipped with a reason (:func:`onnxclp.layers.find_nested`); with it, the calls are replaced by their
bodies (``onnx.inliner.inline_local_functions``: same computation, the functions' nodes renamed per call) and
the flat graph is sanitized. The output then has no local functions: that is the cost, and why it is opt-in.

A hostile file can make inlining explode (each level of a function calling another twice doubles the graph)
or never end (a function that calls itself): the expanded size is counted first, and both are refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from onnxclp.errors import OnnxclpError
from onnxclp.tensors import iter_graphs

if TYPE_CHECKING:
    from onnxclp.pipeline import PassResult, State

# Refuse an expansion to more nodes than this (a ResNet-152 has about 500; a large ViT a few thousand), and
# functions nested deeper than this (onnx's inliner recurses in C++; exporters nest a few levels).
MAX_INLINED_NODES = 200_000
MAX_CALL_DEPTH = 32


def _key(domain: str, name: str, overload: str = "") -> tuple[str, str, str]:
    return (domain, name, overload)


def _call_key(node: onnx.NodeProto) -> tuple[str, str, str]:
    return _key(node.domain, node.op_type, getattr(node, "overload", ""))


def expanded_size(model: onnx.ModelProto) -> int:
    """Node count of the model once every local function call is inlined (refuses recursion)."""
    functions = {_key(f.domain, f.name, getattr(f, "overload", "")): f for f in model.functions}
    sizes: dict[tuple[str, str, str], int] = {}
    active: set[tuple[str, str, str]] = set()

    def nodes_size(nodes) -> int:
        total = 0
        for node in nodes:
            key = _call_key(node)
            total += function_size(key) if key in functions else 1
            for a in node.attribute:
                graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                for g in graphs:
                    total += nodes_size(g.node)
            if total > MAX_INLINED_NODES:
                raise OnnxclpError(
                    f"--inline-functions: the model's functions would expand to more than {MAX_INLINED_NODES:,} nodes"
                )
        return total

    def function_size(key: tuple[str, str, str]) -> int:
        if key in sizes:
            return sizes[key]
        if key in active:
            raise OnnxclpError(f"--inline-functions: function {key[0]}.{key[1]} calls itself (recursion)")
        if len(active) >= MAX_CALL_DEPTH:
            raise OnnxclpError(f"--inline-functions: functions call each other more than {MAX_CALL_DEPTH} deep")
        active.add(key)
        sizes[key] = nodes_size(functions[key].node)
        active.discard(key)
        return sizes[key]

    return nodes_size(model.graph.node)


def inline_functions(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with its local functions inlined, and the names of the functions that were called.

    Returns the model unchanged (and an empty list) when no local function is called.
    """
    functions = {_key(f.domain, f.name, getattr(f, "overload", "")) for f in model.functions}
    called = sorted(
        {f"{n.domain}.{n.op_type}" for g in iter_graphs(model.graph) for n in g.node if _call_key(n) in functions}
    )
    if not called:
        return model, []
    expanded_size(model)
    import onnx.inliner  # only when asked for

    try:
        flat = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # onnx's C++ inliner raises bare RuntimeError/ValueError on malformed functions
        raise OnnxclpError(f"--inline-functions: onnx could not inline the functions ({type(exc).__name__})") from exc
    return flat, called


def run(state: State) -> PassResult:
    """Pipeline pass: with ``--inline-functions``, replace the model by its inlined copy (a new tensor store)."""
    from onnxclp.pipeline import PassResult
    from onnxclp.tensors import TensorStore

    if not state.options.inline_functions:
        return PassResult()
    flat, called = inline_functions(state.model)
    if called:
        store = TensorStore(flat, state.store.base_dir, state.store.source)
        store.size_hint = state.store.size_hint
        state.model, state.store = flat, store
    state.inlined_functions = called
    return PassResult(len(called))
