"""``classifier``: is one class of the classifier layer an outlier among the classes?

A poisoned-label backdoor teaches the last layer a shortcut into the target class: in the models measured in
docs/detect.md the target's row of the classifier weight stands apart from the other classes' rows. Per class
``c`` the statistic is the spread-normalised excess of its row over the other rows, ``d_c = sum of the positive
part of (W[c] - mean_{i != c} W[i])`` (the quantity LPP's classifier step ranks inputs by, LPP paper section 3.3,
summed over inputs), and the class's anomaly index is its robust z-score among the classes,
``(d_c - median d) / (1.4826 MAD d)`` (as in Neural Cleanse, Wang et al., IEEE S&P 2019, section IV-C, where it is
applied to reverse-engineered trigger norms). Null hypothesis: the classes are exchangeable, the indices roughly
standard normal; p-value of the largest of K with the Sidak correction. Target: the argmax class.

The classifier is the one layer that produces the model output (:mod:`onnxclp.layers`): a fully connected layer
(Gemm, or MatMul with a constant weight on either side), or a 1x1 convolution (group 1) whose logits are globally
pooled, after it (Conv -> GlobalAveragePool -> Flatten) or before it (GlobalAveragePool -> Conv, output N x K x 1 x
1): each output channel is a class, its weight row ``W[c, :, 0, 0]``. Any other output layer (a k x k convolution,
a 1x1 convolution writing a spatial map) is not read: the detector says why, and a model no detector reads is
``unverified``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from onnxclp import weights
from onnxclp.detect import Detector, DetectorResult, max_normal_p, register
from onnxclp.pipeline import State

if TYPE_CHECKING:
    from onnxclp.graph import GraphIndex
    from onnxclp.layers import Layer

# Ops that pool a feature map globally (or spatially: an AveragePool/MaxPool over the whole map, as exporters write
# adaptive pooling to 1x1) and ops that carry a tensor on unchanged but for its shape.
_POOL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "ReduceMean", "ReduceMax", "ReduceSum",
                       "AveragePool", "MaxPool"})  # fmt: skip
_PASS_OPS = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast"})


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
        a = class_anomaly(state)
        if isinstance(a, str):
            return a
        target = int(np.argmax(a))
        z = float(a[target])
        p = max_normal_p(z, len(a))
        return DetectorResult(z, p, target, f"class {target}: anomaly index {z:.2f} among {len(a)} classes")


def class_anomaly(state: State) -> np.ndarray | str:
    """Every class's anomaly index (module docstring), or why the classifier layer cannot be read (also
    fst-gate's ranking of the suspected target classes)."""
    assert state.index is not None
    layer = classifier_layer(state)
    if isinstance(layer, str):
        return layer
    w = layer.layout.to_channels(weights.read(state.index, state.store, layer.weight).astype(np.float64))
    w = w.reshape(w.shape[0], -1)
    if w.shape[0] < 3 or not np.all(np.isfinite(w)):
        return f"classifier {layer.key!r} has {w.shape[0]} classes (need 3) or non-finite weights"
    return anomaly_index(class_excess(w))


def classifier_layer(state: State) -> Layer | str:
    """The model's classifier layer (module docstring), or why there is none that this detector can read."""
    assert state.index is not None
    outputs = [layer for layer in state.found if layer.is_output]
    if not outputs:
        return "no layer with weights produces the model output directly (an activation or no classifier layer)"
    if len(outputs) > 1:
        keys = ", ".join(repr(layer.key) for layer in outputs)
        return f"{len(outputs)} layers produce model outputs ({keys}): no single classifier layer"
    layer = outputs[0]
    if layer.is_fc:
        return layer
    kernel = tuple(layer.weight_shape[2:])
    if layer.op != "Conv" or layer.layout.group != 1 or any(k != 1 for k in kernel):
        what = "x".join(str(k) for k in kernel) + " " if kernel else ""
        return (
            f"the output layer {layer.key!r} is a {what}{layer.op}"
            + (f" with group {layer.layout.group}" if layer.layout.group != 1 else "")
            + ", not a fully connected or 1x1 convolution classifier"
        )
    if not _globally_pooled(state.index, layer):
        return f"the output layer {layer.key!r} is a 1x1 Conv whose output is not globally pooled (a spatial map)"
    return layer


def _globally_pooled(index: GraphIndex, layer: Layer) -> bool:
    """Whether the 1x1 convolution ``layer`` reads a pooled feature vector or its output is pooled on the way to the
    model output."""
    name = layer.input_name
    for _ in range(16):  # back through shape-only ops to the op that made the input
        node = index.producer.get(name)
        if node is None or not node.input:
            break
        if node.op_type in _POOL_OPS:
            return True
        if node.op_type not in _PASS_OPS:
            break
        name = node.input[0]
    seen: set[str] = set()
    todo = [layer.output]
    while todo:  # forward to the model outputs
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in index.consumers.get(name, []):
            if node.op_type in _POOL_OPS:
                return True
            todo.extend(o for o in node.output if o)
    return False
