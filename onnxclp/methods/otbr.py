"""OTBR, stage 1: prune the channels whose weights move most when the model unlearns random labels on random-noise
images (Lin, Liu, Li & Xiong, "Fusing Pruned and Backdoored Models: Optimal Transport-based Data-free Backdoor
Mitigation", AAAI 2025, section "Random-unlearning NWC pruning"; :mod:`onnxclp.defences.otbr`,
docs/algorithms.md, "OTBR").

Data-free but runs the model (the torch bridge, ``eval`` extra). Only the pruning stage edits the model: the
paper's second stage (optimal-transport fusion of the pruned and the original weights) rewrites every weight, which
onnxclp's editing rule (pruned channels exactly zero, nothing else changed) does not allow; the fusion is in
:func:`onnxclp.defences.otbr.ot_fuse` for experiments.

Default (written before measuring on the zoo): ``ratio`` 0.05, the global fraction of scored channels pruned,
largest weight change first (our reading of the paper's pruning set; its exact default was not verified), and
the unlearning budget of :func:`~onnxclp.defences.otbr.otbr_channel_scores` (20 steps of 128 noise images).
"""

from __future__ import annotations

import numpy as np

from onnxclp.methods import register
from onnxclp.methods.base import Method, ParamSpec
from onnxclp.pipeline import State
from onnxclp.select import Selection, Thresholds


@register
class OTBR(Method):
    name = "otbr"
    per_layer = False
    order = 10
    description = (
        "EXPERIMENTAL: OTBR (AAAI 2025), pruning stage only: prune the channels that random-noise unlearning moves "
        "most. Measured: -25 to -34 pt of ACC, 43-64 % ASR left on average (docs/algorithms.md, OTBR)."
    )
    experimental = (
        "otbr is experimental: measured on two earlier zoos, it cost 25 points of accuracy and left 64 % ASR on "
        "average over 6 models, and 34 points / 43 % over 8 others (docs/algorithms.md, 'OTBR'); its paper's "
        "second stage (optimal-transport fusion) is not applied"
    )
    paper = "Lin et al., Fusing Pruned and Backdoored Models: Optimal Transport-based Data-free Backdoor Mitigation, AAAI 2025"
    extra = "eval"
    score = None
    include_fc = False
    params = (
        ParamSpec(
            "ratio",
            float,
            0.05,
            "Global fraction of channels pruned, largest weight change first.",
            minimum=0.0,
            maximum=1.0,
        ),
        ParamSpec("steps", int, 20, "Unlearning steps on random-noise batches.", minimum=1),
    )

    def decide(self, state: State) -> None:
        from onnxclp.defences.otbr import ScoredLayer as Spec
        from onnxclp.defences.otbr import otbr_channel_scores, select_top
        from onnxclp.defences.run import model_run
        from onnxclp.passes.decide import Decision
        from onnxclp.passes.score import ScoredLayer
        from onnxclp.report import SkippedLayer

        r = model_run(state)
        hidden, specs = [], []
        for layer in state.layers:
            if layer.is_output:
                continue
            name = layer.weight.tensor.name
            if not layer.weight.plain or name not in r.module.float_initializer_names:
                state.skipped.append(
                    SkippedLayer(layer.key, layer.op, "otbr: the weight is not a plain float initializer", name)
                )
                continue
            axis = 1 if layer.op == "ConvTranspose" or layer.layout.kind == "cols" else 0
            hidden.append(layer)
            specs.append(Spec(name, axis))
        nwc = otbr_channel_scores(
            r.module, specs, r.inputs(), steps=state.params["steps"],
        )  # fmt: skip
        chosen = select_top({s.weight: nwc.scores[s.weight] for s in specs}, state.params["ratio"])
        decisions = []
        for layer, spec in zip(hidden, specs, strict=True):
            s = np.asarray(nwc.scores[spec.weight], dtype=np.float64)
            sel = Selection(
                prune=chosen[spec.weight],
                thresholds=Thresholds(float(s.mean()), float(s.std(ddof=1)) if s.size > 1 else 0.0),
            )
            decisions.append(Decision(ScoredLayer(layer, s, "nwc"), sel))
        state.decisions = decisions
        state.notes.append(f"otbr: {nwc.steps} unlearning steps, loss {nwc.loss_first:.3f} -> {nwc.loss_last:.3f}")
