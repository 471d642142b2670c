"""``l2``: the Frobenius norm of each channel's kernel (LPP paper, section 3.2)."""

from __future__ import annotations

import numpy as np

from onnxclp import scores
from onnxclp.scoring import LayerView, Score, register


@register
class L2(Score):
    name = "l2"
    description = "Frobenius norm of W_k (LPP)"

    def compute(self, view: LayerView) -> np.ndarray:
        return np.concatenate([scores.l2(c) for c in view.chunks()])
