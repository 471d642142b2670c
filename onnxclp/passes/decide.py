"""The method's decisions for every scored layer (the method is a registered module, :mod:`onnxclp.methods`).

:func:`decide_by_scores` is the rule of the score-based methods (CLP, LPP and others that select channels from
one score per channel): layers whose output is a model output (their channels are classes) are never pruned or
rescaled; the method's classifier step may edit them when they are fully connected. Every hidden layer gets the
method's :meth:`~onnxclp.methods.base.Method.select` of its scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from onnxclp import weights
from onnxclp.passes.score import ScoredLayer
from onnxclp.pipeline import PassResult, State
from onnxclp.select import Selection, TopK

if TYPE_CHECKING:
    from onnxclp.methods import Method

OUTPUT_NOTE = "produces a model output: its channels are classes, never pruned"


@dataclass
class Decision:
    """What to do to one scored layer."""

    scored: ScoredLayer
    selection: Selection = field(default_factory=Selection)
    topk: TopK | None = None
    note: str | None = None


def decide_by_scores(state: State, method: Method) -> None:
    """One :class:`Decision` per scored layer, from its scores (pure numpy but for the classifier's weight)."""
    assert state.index is not None
    decisions = []
    for sl in state.scored:
        layer = sl.layer
        if layer.is_output:
            d = Decision(sl, note=OUTPUT_NOTE)
            if layer.is_fc:
                w = layer.layout.to_channels(weights.read(state.index, state.store, layer.weight).astype(np.float64))
                d.topk = method.classifier_step(w[:, 0, :], state.params)
            decisions.append(d)
            continue
        note = None if sl.scores.size >= 2 else "a single channel has no spread: nothing selected"
        decisions.append(Decision(sl, method.select(sl.scores, state.params), note=note))
    state.decisions = decisions


def run(state: State) -> PassResult:
    """Pipeline pass: the method decides (score-based methods select per layer; others run the model)."""
    state.method.decide(state)
    return PassResult(sum(len(d.selection.prune) + len(d.selection.rescale) for d in state.decisions))
