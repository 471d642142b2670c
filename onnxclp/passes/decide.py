"""CLP and LPP decisions for every scored layer, from its scores (ALGORITHMS.md sections 4 and 5).

Layers whose output is a model output (their channels are classes) are never pruned or rescaled; under LPP
the classifier top-k step applies to them when they are fully connected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxclp import weights
from onnxclp.graph import GraphIndex
from onnxclp.io import TensorStore
from onnxclp.passes.score import ScoredLayer
from onnxclp.select import Selection, TopK, classifier_topk, select_clp, select_lpp


@dataclass
class Params:
    """Parameters of a method; the defaults are onnxclp's (README, docs/lpp-defaults.md)."""

    method: str = "clp"
    u: float = 3.0
    u_low: float = -3.0
    bias_rate: float = 1.5
    topk: int = 0
    score: str = "spectral"
    include_fc: bool = False


@dataclass
class Decision:
    """What to do to one scored layer."""

    scored: ScoredLayer
    selection: Selection = field(default_factory=Selection)
    topk: TopK | None = None
    note: str | None = None


def decide(scored: list[ScoredLayer], params: Params, index: GraphIndex, store: TensorStore) -> list[Decision]:
    """One :class:`Decision` per scored layer."""
    decisions = []
    for sl in scored:
        layer = sl.layer
        if layer.is_output:
            d = Decision(sl, note="produces a model output: its channels are classes, never pruned")
            if params.method == "lpp" and layer.is_fc and params.topk > 0:
                w = layer.layout.to_channels(weights.read(index, store, layer.weight).astype(np.float64))[:, 0, :]
                d.topk = classifier_topk(w, params.topk)
            decisions.append(d)
            continue
        if params.method == "clp":
            sel = select_clp(sl.scores, params.u)
        else:
            sel = select_lpp(sl.scores, params.u, params.u_low, params.bias_rate)
        note = None if sl.scores.size >= 2 else "a single channel has no spread: nothing selected"
        decisions.append(Decision(sl, sel, note=note))
    return decisions
