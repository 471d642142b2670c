"""Record what onnxclp did in the model's metadata_props (other entries are kept as they are)."""

from __future__ import annotations

import json

import onnx

from onnxclp.report import Report


def annotate(model: onnx.ModelProto, report: Report) -> None:
    """Set ``onnxclp.*`` metadata entries: version, method, parameters and pruned channel count."""
    entries = {
        "onnxclp.version": report.version,
        "onnxclp.method": report.method,
        "onnxclp.params": json.dumps(report.params, sort_keys=True),
        "onnxclp.pruned_channels": str(report.pruned_channels),
    }
    if report.method == "lpp":
        entries["onnxclp.rescaled_channels"] = str(report.rescaled_channels)
    existing = {p.key: p for p in model.metadata_props}
    for key, value in entries.items():
        if key in existing:
            existing[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
