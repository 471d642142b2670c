"""Record what onnxclp did in the model's metadata_props (other entries are kept as they are)."""

from __future__ import annotations

import json

import onnx

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


def run(state: State) -> PassResult:
    """Pipeline pass (only when editing)."""
    if not state.options.edit:
        return PassResult()
    assert state.report is not None
    annotate(state.model, state.report, state.method.rescales)
    return PassResult(1)
