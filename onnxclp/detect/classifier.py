"""``classifier``: is one class of the classifier layer an outlier among the classes?

A poisoned-label backdoor teaches the last layer a shortcut into the target class: in the models measured in
docs/detect.md the target's row of the classifier weight stands apart from the other classes' rows. Per class
``c`` the statistic is the spread-normalised excess of its row over the other rows, ``d_c = sum of the positive
part of (W[c] - mean_{i != c} W[i])`` (the quantity LPP's classifier step ranks inputs by, LPP paper section 3.3,
summed over inputs), and the class's anomaly index is its robust z-score among the classes,
``(d_c - median d) / (1.4826 MAD d)`` (as in Neural Cleanse, Wang et al., IEEE S&P 2019, section IV-C, where it is
applied to reverse-engineered trigger norms). Null hypothesis: the classes are exchangeable, the indices roughly
standard normal; p-value of the largest of K with the Sidak correction. Target: the argmax class.
"""

from __future__ import annotations

import numpy as np

from onnxclp import weights
from onnxclp.detect import Detector, DetectorResult, max_normal_p, register
from onnxclp.pipeline import State


def class_excess(w: np.ndarray) -> np.ndarray:
    """``d_c`` for every row of ``w`` (classes, inputs): positive part of the row minus the others' mean, summed."""
    w = np.asarray(w, dtype=np.float64)
    k = w.shape[0]
    others = (w.sum(axis=0, keepdims=True) - w) / (k - 1)
    return np.clip(w - others, 0.0, None).sum(axis=1)


def anomaly_index(x: np.ndarray) -> np.ndarray:
    """Robust z-scores: ``(x - median) / (1.4826 * MAD)`` (MAD floored to keep a constant vector finite)."""
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med))) * 1.4826
    return (x - med) / max(mad, 1e-12 * max(1.0, abs(med)))


@register
class Classifier(Detector):
    name = "classifier"
    description = "an outlier class in the classifier layer's weights (robust z of the class's excess, Sidak)"

    def run(self, state: State) -> DetectorResult | str:
        assert state.index is not None
        outputs = [layer for layer in state.found if layer.is_output and layer.is_fc]
        if len(outputs) != 1:
            return "no single fully connected classifier layer producing the model output"
        layer = outputs[0]
        w = layer.layout.to_channels(weights.read(state.index, state.store, layer.weight).astype(np.float64))[:, 0, :]
        if w.shape[0] < 3 or not np.all(np.isfinite(w)):
            return f"classifier {layer.key!r} has {w.shape[0]} classes (need 3) or non-finite weights"
        a = anomaly_index(class_excess(w))
        target = int(np.argmax(a))
        z = float(a[target])
        p = max_normal_p(z, w.shape[0])
        return DetectorResult(z, p, target, f"class {target}: anomaly index {z:.2f} among {w.shape[0]} classes")
