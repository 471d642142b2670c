"""A Keras CNN converted by tf2onnx (fixtures made by tests/models/make_keras_models.py with TensorFlow).

Checks that every scored layer is found and paired (BN folded into Convs, BN as Mul/Add after the depthwise
Conv, SeparableConv2D as two Convs, Dense as MatMul + Add), that onnxclp's scores equal the scores computed
from the Keras weights, and that pruning a channel in ONNX gives the Keras model's output with the same
channel pruned in Keras (within 1e-4).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import run

import onnxclp

MODELS = Path(__file__).parent / "models"


@pytest.fixture(scope="module")
def keras_cnn():
    return onnx.load(str(MODELS / "keras_cnn.onnx")), dict(np.load(MODELS / "keras_cnn.npz"))


def _by_keras_name(report, ref):
    """Map Keras layer names to onnxclp layer reports by matching reference scores."""
    mapping = {}
    for key in (k for k in ref if k.startswith("scores/")):
        name, scores = key.split("/", 1)[1], ref[key]
        hits = [
            layer
            for layer in report.layers
            if layer.channels == len(scores) and np.allclose(layer.scores, scores, rtol=1e-4)
        ]
        assert len(hits) == 1, f"{name}: {len(hits)} ONNX layers match the Keras scores"
        mapping[name] = hits[0]
    return mapping


def test_all_layers_found_paired_and_scored_like_keras(keras_cnn):
    model, ref = keras_cnn
    report = onnxclp.scan(model, include_fc=True)
    assert report.skipped == []
    layers = _by_keras_name(report, ref)
    assert set(layers) == {"conva", "convb", "dwc", "sepd_dw", "sepd_pw", "fc1"}
    assert layers["dwc"].affine is not None and "mul" in layers["dwc"].affine.lower()
    assert layers["fc1"].op == "MatMul" and layers["fc1"].role == "hidden"
    (classifier,) = [layer for layer in report.layers if layer.role == "output"]
    assert classifier.channels == 5
    for name, layer in layers.items():
        hot = int(next(k for k in ref if k.startswith(f"pruned/{name}/")).rsplit("/", 1)[1])
        assert layer.pruned == [hot], name


def test_outputs_match_keras_pruning(keras_cnn):
    model, ref = keras_cnn
    x = ref["x"]
    np.testing.assert_allclose(run(model, {"image": x})[0], ref["output"], atol=1e-4)
    layers = _by_keras_name(onnxclp.scan(model, include_fc=True), ref)
    for key in (k for k in ref if k.startswith("pruned/")):
        _, name, _ = key.split("/")
        others = [layer.node for n, layer in layers.items() if n != name]
        out, rep = onnxclp.sanitize(model, include_fc=True, exclude=[f"^{re.escape(o)}$" for o in others])
        assert rep.pruned_channels == 1
        np.testing.assert_allclose(run(out, {"image": x})[0], ref[key], atol=1e-4, err_msg=name)
