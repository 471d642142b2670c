"""Generate the tf2onnx fixtures of tests/test_tf2onnx.py (needs tensorflow-cpu and tf2onnx; not run in CI).

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfenv/bin/python tests/models/make_keras_models.py

For a small Keras CNN (Conv2D + BatchNormalization with and without a conv bias, DepthwiseConv2D + BN,
SeparableConv2D, Dense layers) with a planted high-norm channel in each layer, it writes:
- ``keras_cnn.onnx``: the model converted by tf2onnx (NHWC input; BN folded into regular Convs, left as
  Mul/Add after the depthwise Conv; Dense as MatMul + Add);
- ``keras_cnn.npz``: an input batch; reference channel scores computed from the Keras weights
  (spectral norm of each output channel's kernel slice times |gamma / sqrt(var + eps)|, docs/algorithms.md,
  "Channels" and "Scores"), keyed by Keras layer name; and, for each layer, the Keras model's output with one chosen
  channel pruned in Keras (BN gamma and beta zeroed, or kernel slice and bias zeroed), keyed
  ``pruned/<layer>/<channel>``, plus the unpruned output.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf2onnx
from tensorflow import keras

OUT = Path(__file__).parent
L = keras.layers
HOT = {"conva": 3, "convb": 9, "dwc": 5, "sepd_dw": 2, "sepd_pw": 17, "fc1": 11}


def build() -> keras.Model:
    inp = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, name="conva")(inp)
    x = L.ReLU()(L.BatchNormalization(name="bna")(x))
    x = L.Conv2D(16, 3, padding="same", use_bias=True, name="convb")(x)
    x = L.ReLU()(L.BatchNormalization(name="bnb")(x))
    x = L.DepthwiseConv2D(3, padding="same", name="dwc")(x)
    x = L.ReLU()(L.BatchNormalization(name="bnc")(x))
    x = L.ReLU()(L.SeparableConv2D(24, 3, padding="same", name="sepd")(x))
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(20, activation="relu", name="fc1")(x)
    return keras.Model(inp, L.Dense(5, name="fc2")(x))


def randomize(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        if isinstance(layer, L.BatchNormalization):
            c = ws[0].shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)]
            )
            continue
        new = [rng.normal(0, 0.3, w.shape).astype(np.float32) for w in ws]
        if isinstance(layer, L.SeparableConv2D):
            new[0][:, :, HOT["sepd_dw"], :] *= 8
            new[1][..., HOT["sepd_pw"]] *= 8
        elif isinstance(layer, L.DepthwiseConv2D):
            new[0][:, :, HOT[layer.name], :] *= 8  # kernel (kh, kw, channels, multiplier)
        elif layer.name in HOT:
            new[0][..., HOT[layer.name]] *= 8
        layer.set_weights(new)


def bn_scale(model: keras.Model, name: str) -> np.ndarray:
    bn = model.get_layer(name)
    g, _, _, v = bn.get_weights()
    return np.abs(g / np.sqrt(v + bn.epsilon))


def spectral(mats: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.svd(m, compute_uv=False).max() for m in mats])


def reference_scores(model: keras.Model) -> dict[str, np.ndarray]:
    s = {}
    for conv, bn in (("conva", "bna"), ("convb", "bnb")):
        w = model.get_layer(conv).get_weights()[0]  # (kh, kw, cin, cout)
        mats = np.transpose(w, (3, 2, 0, 1)).reshape(w.shape[3], w.shape[2], -1)
        s[conv] = spectral(mats) * bn_scale(model, bn)
    dw = model.get_layer("dwc").get_weights()[0]  # (kh, kw, c, 1)
    s["dwc"] = np.linalg.norm(dw.reshape(-1, dw.shape[2]), axis=0) * bn_scale(model, "bnc")
    sep_dw, sep_pw, _ = model.get_layer("sepd").get_weights()
    s["sepd_dw"] = np.linalg.norm(sep_dw.reshape(-1, sep_dw.shape[2]), axis=0)
    s["sepd_pw"] = np.linalg.norm(sep_pw.reshape(sep_pw.shape[2], -1), axis=0)
    s["fc1"] = np.linalg.norm(model.get_layer("fc1").get_weights()[0], axis=0)
    return s


def pruned_output(model: keras.Model, layer: str, k: int, x: np.ndarray) -> np.ndarray:
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    if layer in ("conva", "convb", "dwc"):
        bn = clone.get_layer({"conva": "bna", "convb": "bnb", "dwc": "bnc"}[layer])
        g, b, m, v = bn.get_weights()
        g[k] = 0
        b[k] = 0
        bn.set_weights([g, b, m, v])
    elif layer == "sepd_dw":
        sep = clone.get_layer("sepd")
        d, p, bias = sep.get_weights()
        d[:, :, k, :] = 0
        sep.set_weights([d, p, bias])
    elif layer == "sepd_pw":
        sep = clone.get_layer("sepd")
        d, p, bias = sep.get_weights()
        p[..., k] = 0
        bias[k] = 0
        sep.set_weights([d, p, bias])
    else:
        fc = clone.get_layer(layer)
        w, bias = fc.get_weights()
        w[:, k] = 0
        bias[k] = 0
        fc.set_weights([w, bias])
    return clone(x, training=False).numpy()


def main() -> None:
    rng = np.random.default_rng(0)
    tf.random.set_seed(0)
    model = build()
    randomize(model, rng)
    x = rng.normal(size=(4, 12, 12, 3)).astype(np.float32)
    spec = (tf.TensorSpec((None, 12, 12, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    proto.producer_name = "tf2onnx"
    with open(OUT / "keras_cnn.onnx", "wb") as fh:
        fh.write(proto.SerializeToString())
    arrays = {"x": x, "output": model(x, training=False).numpy()}
    for name, scores in reference_scores(model).items():
        arrays[f"scores/{name}"] = scores
        arrays[f"pruned/{name}/{HOT[name]}"] = pruned_output(model, name, HOT[name], x)
    np.savez(OUT / "keras_cnn.npz", **arrays)
    print("wrote", OUT / "keras_cnn.onnx", OUT / "keras_cnn.npz")


if __name__ == "__main__":
    main()
