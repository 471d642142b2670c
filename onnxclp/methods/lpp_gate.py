"""``lpp-gate``: the target gate with LPP's pruned network as its copy, from the weights alone (docs/algorithms.md,
"lpp-gate"; :mod:`onnxclp.methods._gate`).

Not a published method: LPP (the LPP paper's section 3) behind onnxclp's target gate. LPP at its defaults
removes four of the zoo's seven backdoors data-free, and costs 5.3 points of clean accuracy on average doing it
(up to 15 on BppAttack: docs/results-repair.md, "Data-free"), because the pruned network answers every image.
Behind the gate it answers only where the input says the first suspected target class and the pruned network
disagrees: a clean image the input gives another class keeps the input's answer exactly, and a triggered image
keeps the target only where the pruned network keeps it too. No image is read: the suspect is the class whose
row of the classifier layer is the largest outlier, either sign (the `classifier` detector's anomaly index, as
fst-gate's ranking; docs/detect.md), and there is no confidence bar and no wider suspect set, since nothing
could test them. The rule (LPP at its defaults, the first suspect, no bar) was written down before it was
measured (docs/results-repair-notes.md, session 20).

Weights only, like LPP: no torch, no onnxruntime. With ``--clean-data`` the guard checks the result as for every
method. Written: the input's nodes and initializers unchanged, LPP's copy (``onnxclp.gate/``, sharing every
initializer LPP left alone) and the gate's nodes; about twice the input's compute.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods.lpp import LPP

if TYPE_CHECKING:
    from onnxclp.pipeline import State


@register
class LPPGate(LPP):
    name = "lpp-gate"
    suggested = False
    order = 2
    description = ("LPP's pruned network behind the target gate: it answers only where the input says the suspected "
                   "target class; adds a copy of the network.")  # fmt: skip
    paper = f"{LPP.paper}; the target gate is onnxclp's"
    prunes_input = False  # the decisions (the report's layers) shape the copy; the input network is kept

    def decide(self, state: State) -> None:
        """LPP's decisions applied to the weights, read off as the copy's values and undone, so that the input
        network stays as it is; the gate composed over both by the pipeline's ``rewrite`` pass (``graph_edit``)."""
        from onnxclp.detect.classifier import class_anomaly
        from onnxclp.edit import Editor
        from onnxclp.methods._gate import compose
        from onnxclp.passes import streams
        from onnxclp.passes.prune import apply_decisions

        assert state.index is not None
        a = class_anomaly(state)
        if isinstance(a, str):
            raise OnnxclpError(
                f"--method lpp-gate ranks the suspected target class from the classifier layer, and cannot read this "
                f"model's: {a} (with clean images, fst-sau-gate --suspects-from mmbd ranks them by MM-BD)",
                3,
            )
        first = int(np.argmax(np.abs(a)))
        super().decide(state)  # LPP's decisions (state.decisions)
        graph = state.model.graph
        names = [t.name for t in graph.initializer]
        wiring = [list(n.input) for n in graph.node]
        before = {n: np.array(state.store.read(state.index.initializers[n]), copy=True) for n in names}
        streams.run(state)
        apply_decisions(Editor(state.index, state.store), state.decisions)
        if [t.name for t in graph.initializer] != names or [list(n.input) for n in graph.node] != wiring:
            raise OnnxclpError("--method lpp-gate: LPP's pruning copied a shared weight for one of its readers, "
                               "which the gate's copy cannot express; use --method lpp", 3)  # fmt: skip
        rewritten = {}
        for n in names:
            after = np.array(state.store.read(state.index.initializers[n]), copy=True)
            if after.shape != before[n].shape or not np.array_equal(after, before[n], equal_nan=True):
                rewritten[n] = after
                state.store.write(state.index.initializers[n], before[n])  # the input network unchanged
        n_pruned = sum(len(d.selection.prune) for d in state.decisions)
        n_scaled = sum(len(d.selection.rescale) for d in state.decisions)
        if not rewritten:
            state.notes.append("lpp-gate: LPP changes nothing in this model, so there is no copy to gate")
            return
        classes = len(a)
        state.graph_edit = lambda st: compose(st.model, [rewritten], [first], classes)
        state.notes.append(
            f"lpp-gate: LPP's copy ({n_pruned} channels pruned, {n_scaled} rescaled, {len(rewritten)} initializers "
            f"changed) answers where the input says class {first} (of {classes}: the classifier's largest anomaly "
            f"index, {a[first]:+.2f}) and the copy disagrees; the input answers everywhere else (the channels the "
            "report lists as pruned and rescaled are the copy's: the input network is unchanged)"
        )
