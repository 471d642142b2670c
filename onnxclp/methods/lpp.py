"""LPP: Lipschitzness Precise Pruning (docs/algorithms.md, "LPP"; the LPP paper's section 3).

Scores each channel by the L2 norm of its kernel times its affine scale, prunes both tails of the layer's
distribution (``> mean + u*std`` and ``< mean + u_low*std``), rescales the band just below the upper threshold
by ``mean / score``, and may zero the ``topk`` classifier weights that most separate the suspected target class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.methods import register
from onnxclp.methods.base import Method, Params, ParamSpec
from onnxclp.methods.clp import U
from onnxclp.pipeline import State
from onnxclp.select import Selection, TopK, classifier_topk, select_lpp


@register
class LPP(Method):
    name = "lpp"
    suggested = True  # scan's next step names it (onnxclp.scanning.suggested_methods)
    order = 1
    description = "Lipschitzness precise pruning: prune both score tails, rescale the band below the threshold."
    paper = "Rethinking Lipschitzness Data-free Backdoor Defense, ICLR 2025 submission (rejected), section 3"
    score = "l2"
    include_fc = True
    output_fc = True
    rescales = True
    params = (
        U,
        ParamSpec(
            "u_low",
            float,
            -3.0,
            "Lower threshold: prune channels below mean + u_low*std.",
            calibration=(-1000.0, -5.0, -4.0, -3.0),
        ),
        ParamSpec(
            "bias_rate",
            float,
            1.0,
            "Rescale channels in (mean+(u-b)*std, mean+u*std].",
            minimum=0.0,
            calibration=(0.0, 0.5, 1.0),
        ),
        ParamSpec("topk", int, 0, "Classifier weights zeroed in the suspected target row.", minimum=0),
        ParamSpec(
            "target_from",
            str,
            "weights",
            "The top-k step's target class: weights (largest mean row) or mmbd (MM-BD's detected target).",
            choices=("weights", "mmbd"),
        ),
    )

    def check(self, values: Mapping[str, Any]) -> None:
        super().check(values)
        if values["u_low"] >= values["u"]:
            raise OnnxclpError(f"--u-low ({values['u_low']}) must be below --u ({values['u']})")

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        return select_lpp(scores, params["u"], params["u_low"], params["bias_rate"])

    def classifier_step(self, w: np.ndarray, params: Params) -> TopK | None:
        return classifier_topk(w, params["topk"], params.values.get("target")) if params["topk"] > 0 else None

    def decide(self, state: State) -> None:
        """Score-based decisions; with ``target_from mmbd`` and ``topk`` > 0 the classifier step's target class is
        MM-BD's (Wang et al., IEEE S&P 2024) instead of the row with the largest mean weight."""
        from dataclasses import replace

        from onnxclp.passes.decide import decide_by_scores

        if state.params["target_from"] == "mmbd" and state.params["topk"] > 0:
            from onnxclp.detect.mmbd import target_class

            target = target_class(state)
            state.params = replace(state.params, values={**state.params.values, "target": target})
            state.notes.append(f"lpp: classifier step on MM-BD's target class {target}")
        decide_by_scores(state, self)
