"""``spectral``: the largest singular value of each channel's kernel (CLP paper, section 4.1: the UCLC)."""

from __future__ import annotations

import numpy as np

from onnxclp import scores
from onnxclp.scoring import LayerView, Score, register


@register
class Spectral(Score):
    name = "spectral"
    description = "largest singular value of W_k reshaped to (C_in, kernel) (CLP's UCLC)"

    def compute(self, view: LayerView) -> np.ndarray:
        return np.concatenate([scores.spectral(c) for c in view.chunks()])
