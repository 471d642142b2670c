"""CLP: Channel Lipschitzness-based Pruning (Zheng, Tang, Li & Liu, "Data-free Backdoor Removal based on
Channel Lipschitzness", ECCV 2022; docs/algorithms.md, "CLP").

Scores each channel by an upper bound of its Lipschitz constant (paper section 4.1, UCLC; 4.4 for BatchNorm)
and prunes the channels whose score is above ``mean + u * std`` of their layer (section 4.5, Algorithm 1).
"""

from __future__ import annotations

import numpy as np

from onnxclp.methods import register
from onnxclp.methods.base import Method, Params, ParamSpec
from onnxclp.select import Selection, select_clp

U = ParamSpec(
    "u",
    float,
    3.0,
    "Upper threshold: prune channels above mean + u*std of their layer.",
    short="-u",
    risky_below=1.0,
)


@register
class CLP(Method):
    name = "clp"
    order = 0
    description = "Channel Lipschitzness-based pruning (ECCV 2022): prune channels with outlying UCLC scores."
    paper = "Zheng et al., Data-free Backdoor Removal based on Channel Lipschitzness, ECCV 2022"
    score = "spectral"
    include_fc = False
    params = (U,)

    def select(self, scores: np.ndarray, params: Params) -> Selection:
        return select_clp(scores, params["u"])
