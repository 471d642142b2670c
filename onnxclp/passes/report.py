"""Assemble the :class:`~onnxclp.report.Report` from the pipeline's state (one entry per scored layer)."""

from __future__ import annotations

from onnxclp._version import __version__
from onnxclp.passes.decide import Decision
from onnxclp.pipeline import PassResult, State
from onnxclp.report import LayerReport, Report, unique_notes


def layer_report(d: Decision) -> LayerReport:
    """The report entry of one decided layer: its scores, thresholds and decisions."""
    layer, s = d.scored.layer, d.scored.scores
    th = d.selection.thresholds
    return LayerReport(
        node=layer.key,
        op=layer.op,
        weight=layer.weight.tensor.name or (layer.weight.node.output[0] if layer.weight.node else ""),
        channels=layer.channels,
        affine=layer.affine_key,
        role="output" if layer.is_output else "hidden",
        score=d.scored.kind,
        scores=[float(x) for x in s],
        score_min=float(s.min()),
        score_mean=float(s.mean()),
        score_max=float(s.max()),
        score_std=float(s.std(ddof=1)) if s.size > 1 else 0.0,
        threshold=th.upper if th else None,
        lower_threshold=th.lower if th else None,
        rescale_from=th.rescale_from if th else None,
        pruned=list(d.selection.prune),
        rescaled=dict(d.selection.rescale),
        topk_target=d.topk.target if d.topk else None,
        topk_zeroed=list(d.topk.columns) if d.topk else [],
        note=d.note,
    )


def run(state: State) -> PassResult:
    report = Report(
        method=state.params.method,
        params=state.params.as_dict(),
        version=__version__,
        fused_batchnorms=state.fused_batchnorms,
    )
    report.input = state.path
    report.skipped = list(state.skipped)
    report.layers = [layer_report(d) for d in state.decisions]
    report.coupled = list(state.coupled)
    report.copied_tensors = list(state.copied_tensors)
    report.inlined_functions = list(state.inlined_functions)
    report.notes = unique_notes(state.notes)  # a note repeated n times: once, with (×n)
    report.guard = None if state.guard is None else state.guard.to_dict()
    report.rewritten = list((state.training or {}).get("rewritten", []))
    report.added_nodes = list(state.added_nodes)
    report.training = None if state.training is None else {k: v for k, v in state.training.items() if k != "rewritten"}
    state.report = report
    return PassResult(len(report.layers))
