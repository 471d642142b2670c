"""Record what onnxclp did in the model's metadata_props (other entries are kept as they are), and settle the
initializers that are also graph inputs: the report lists those that were edited (with a note that a runtime fed
a value for such an input runs with that value instead), and ``Options.drop_initializer_inputs`` removes every
initializer from the graph inputs, as onnxruntime's ``remove_initializer_from_input`` tool does (IR version 4 or
later; :mod:`onnxclp.passes.find` refuses the option on IR version 3 before any work)."""

from __future__ import annotations

import json

import onnx

from onnxclp.errors import OnnxclpError
from onnxclp.graph import INITIALIZER_INPUTS_OPTIONAL_IR, initializer_inputs
from onnxclp.pipeline import PassResult, State
from onnxclp.report import Report


def annotate(model: onnx.ModelProto, report: Report, rescales: bool = False) -> None:
    """Set ``onnxclp.*`` metadata entries: version, method, parameters and pruned (and rescaled) channel counts."""
    entries = {
        "onnxclp.version": report.version,
        "onnxclp.method": report.method,
        "onnxclp.params": json.dumps(report.params, sort_keys=True),
        "onnxclp.pruned_channels": str(report.pruned_channels),
    }
    if rescales:
        entries["onnxclp.rescaled_channels"] = str(report.rescaled_channels)
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


OVERRIDE_NOTE = (
    "{n} edited weight(s) are initializers that are also graph inputs, kept as inputs so the model's interface "
    "is unchanged: a runtime that lets a caller feed such an input (onnxruntime does from IR version 4; this "
    "model has IR version {ir}) runs with the value fed instead of the stored one, sanitized or not"
)


def drop_initializer_inputs(model: onnx.ModelProto) -> list[str]:
    """Remove every initializer from the main graph's inputs (IR version >= 4); returns the names removed."""
    if model.ir_version < INITIALIZER_INPUTS_OPTIONAL_IR:
        raise OnnxclpError(f"IR version {model.ir_version} requires every initializer to be a graph input")
    names = set(initializer_inputs(model.graph))
    if not names:
        return []
    removed = [i.name for i in model.graph.input if i.name in names]
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return removed


def settle_initializer_inputs(state: State, report: Report) -> int:
    """Fill ``report.initializer_inputs`` (edited initializers that are graph inputs) and its note; drop them all
    from the graph inputs with ``Options.drop_initializer_inputs``. Returns how many inputs were dropped."""
    edited = set(state.store.edited)
    report.initializer_inputs = [n for n in initializer_inputs(state.model.graph) if n in edited]
    dropped: list[str] = []
    if state.options.drop_initializer_inputs:
        dropped = drop_initializer_inputs(state.model)
        if dropped:
            report.notes.append(
                f"--drop-initializer-inputs: {len(dropped)} initializer(s) removed from the graph inputs; "
                "the model's weights can no longer be fed at run time"
            )
    elif report.initializer_inputs:
        report.notes.append(OVERRIDE_NOTE.format(n=len(report.initializer_inputs), ir=state.model.ir_version))
    return len(dropped)


def run(state: State) -> PassResult:
    """Pipeline pass (only when editing)."""
    if not state.options.edit:
        return PassResult()
    assert state.report is not None
    settle_initializer_inputs(state, state.report)
    annotate(state.model, state.report, state.method.rescales)
    ctx = state.options.context
    if ctx.get("mean") is not None and ctx.get("std") is not None:  # what the model takes, for evaluate later
        from onnxclp.eval.normalize import set_normalization

        set_normalization(state.model, ctx["mean"], ctx["std"])
    return PassResult(1)
