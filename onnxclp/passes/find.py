"""Index the graph and find its scored layers (:func:`onnxclp.layers.find_layers`); layers that cannot be scored,
and scored-op nodes inside subgraphs or functions, are recorded as skipped with the reason.

The index reads every operator at the model's opset and knows its IR version (:meth:`GraphIndex.of`). With
``Options.drop_initializer_inputs`` the model must be of IR version 4 or later: it is refused here, before any
scoring, on IR version 3, which requires every initializer to be a graph input.
"""

from __future__ import annotations

from onnxclp.errors import OnnxclpError
from onnxclp.graph import INITIALIZER_INPUTS_OPTIONAL_IR, GraphIndex
from onnxclp.layers import find_layers, find_nested
from onnxclp.pipeline import PassResult, State


def check_drop_initializer_inputs(state: State) -> None:
    """Refuse ``--drop-initializer-inputs`` on a model whose IR version requires initializers as inputs."""
    if not state.options.drop_initializer_inputs or not state.options.edit:
        return
    ir = int(state.model.ir_version)
    if ir < INITIALIZER_INPUTS_OPTIONAL_IR:
        raise OnnxclpError(
            f"--drop-initializer-inputs: the model has IR version {ir}, which requires every initializer to be a "
            f"graph input (runtimes treat them as constants there: onnxruntime refuses a value fed for one); "
            f"only IR version {INITIALIZER_INPUTS_OPTIONAL_IR} or later can drop them: leave the option out"
        )


def run(state: State) -> PassResult:
    check_drop_initializer_inputs(state)
    state.index = GraphIndex.of(state.model)
    found = find_layers(state.index, state.store)
    state.found = list(found.layers)
    state.layers = list(found.layers)
    state.skipped = [*state.skipped, *found.skipped, *find_nested(state.model)]
    return PassResult(len(state.layers))
