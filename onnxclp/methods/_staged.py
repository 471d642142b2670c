"""What the staged methods share: a pruning stage applied to the model before a trained stage runs on it
(clp-npd, clp-npd-fst, clp-ac: CLP's pruning; bnp-ac: BNP's), and CLP's pruning as that first stage.

The pruning stage's ``u`` is tuned on the fit images within ``tune_share`` of the budget
(:mod:`onnxclp.passes.tune` calls ``decide_for_tuning``, the pruning alone); :func:`prune_now` applies the decisions
to the model, so that the second stage trains on the pruned model, and the pipeline's ``prune`` pass re-applies
the same zeros (idempotent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from onnxclp.select import select_clp

if TYPE_CHECKING:
    import numpy as np

    from onnxclp.methods.base import Params
    from onnxclp.pipeline import State
    from onnxclp.select import Selection


class CLPFirst:
    """Mixin (listed before the second stage's class): CLP's spectral scores and outlier rule as the first stage."""

    score = "spectral"
    include_fc = False
    per_layer = True
    tune_share = 1.0 / 3.0  # the pruning stage's share of --max-acc-drop; the second stage measures the rest

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        return select_clp(scores, params["u"])

    def decide_for_tuning(self, state: State) -> None:
        """The pruning stage alone (what ``u`` changes)."""
        from onnxclp.passes.decide import decide_by_scores

        decide_by_scores(state, self)  # type: ignore[arg-type]

    def prune_first(self, state: State, then: str) -> list[Any]:
        """The first stage: CLP's decisions, applied to the model now (:func:`prune_now`); returns them."""
        self.decide_for_tuning(state)
        return prune_now(state, then)


def prune_now(state: State, then: str) -> list[Any]:
    """Apply ``state.decisions`` (the first stage's) to the model now, note it, and return them (the method puts
    them back in ``state.decisions`` after its second stage, named ``then`` in the note)."""
    from onnxclp.edit import Editor
    from onnxclp.passes import streams
    from onnxclp.passes.prune import apply_decisions

    assert state.index is not None
    streams.run(state)
    apply_decisions(Editor(state.index, state.store), state.decisions)
    n = sum(len(d.selection.prune) for d in state.decisions)
    state.notes.append(
        f"{state.params.method}: {n} channel(s) pruned at u={state.params['u']:g}, then {then} on the pruned model"
    )
    return list(state.decisions)
