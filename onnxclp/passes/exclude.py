"""Leave out the layers the user excluded (``--exclude`` regular expressions on layer or weight names) and the
fully connected layers the method does not score (a method's ``include_fc``/``output_fc``; ``--include-fc``)."""

from __future__ import annotations

import re

from onnxclp.errors import OnnxclpError
from onnxclp.pipeline import PassResult, State
from onnxclp.report import SkippedLayer


def run(state: State) -> PassResult:
    try:
        patterns = [re.compile(p) for p in state.options.exclude]
    except re.error as exc:
        raise OnnxclpError(f"--exclude: invalid regular expression ({exc})") from exc
    kept = []
    for layer in state.layers:
        names = (layer.key, layer.weight.tensor.name or "")
        hit = next((p.pattern for p in patterns if any(p.search(n) for n in names)), None)
        if hit is not None:
            reason = f"excluded by --exclude {hit!r}"
        elif layer.is_fc and not state.params.include_fc and not (state.method.output_fc and layer.is_output):
            reason = f"fully connected: not scored by {state.method.name.upper()} (use --include-fc)"
        else:
            kept.append(layer)
            continue
        state.skipped.append(SkippedLayer(layer.key, layer.op, reason, layer.weight.tensor.name))
    left_out = len(state.layers) - len(kept)
    state.layers = kept
    return PassResult(left_out)
