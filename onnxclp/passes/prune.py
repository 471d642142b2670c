"""Apply the decisions to the model's constants (docs/algorithms.md, "Editing"): zero pruned channels, rescale
banded ones, zero the classifier step's weights. Shared tensors are copied first (:class:`onnxclp.edit.Editor`)."""

from __future__ import annotations

from onnxclp.edit import Editor
from onnxclp.passes.decide import Decision
from onnxclp.pipeline import PassResult, State


def apply_decisions(editor: Editor, decisions: list[Decision]) -> int:
    """Zero pruned channels, rescale banded ones, zero top-k classifier weights; returns the edit count."""
    edits = 0
    for d in decisions:
        layer = d.scored.layer
        if d.selection.prune:
            editor.zero_channels(layer, d.selection.prune)
            edits += len(d.selection.prune)
        if d.selection.rescale:
            editor.rescale_channels(layer, d.selection.rescale)
            edits += len(d.selection.rescale)
        if d.topk is not None and d.topk.columns:
            editor.zero_weights(layer, d.topk.target, d.topk.columns)
            edits += len(d.topk.columns)
    return edits


def run(state: State) -> PassResult:
    """Pipeline pass (only when editing: ``scan`` reports without it)."""
    if not state.options.edit or not state.method.prunes_input:
        return PassResult()
    assert state.index is not None
    editor = Editor(state.index, state.store)
    edits = apply_decisions(editor, state.decisions)
    state.copied_tensors = list(editor.copies)
    return PassResult(edits)
