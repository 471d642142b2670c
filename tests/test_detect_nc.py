"""The few-shot detector ``nc`` (Neural Cleanse, issue 20): a hand-built model whose class 3 fires on a 2x2 corner
patch (a known backdoor: the smallest trigger is that corner), its clean twin without the patch path, ``scan
--clean-data`` running it beside the default detectors, and the reasons it gives when it cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_gate_verdicts import invoke, save, scan

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

K, S = 10, 16  # classes (the detector needs at least 10), image side


def patch_model(backdoor: bool, nhwc: bool = False) -> onnx.ModelProto:
    """An identity 1x1 Conv, then scores from the three channel means (classes 0-2 each one channel, class 4 the
    dark images, 5-9 mixtures of channels) and, with
    ``backdoor``, class 3 = 40 x (mean of channel 0's bottom-right 2x2 corner) - 24: silent on clean images, on
    when the corner is bright. ``nhwc``: the input is N x H x W x C, transposed first (a TensorFlow-style export)."""
    w = np.zeros((4, K), np.float32)
    w[0, 0] = w[1, 1] = w[2, 2] = 8.0
    w[:3, 4] = -8.0
    bias = np.array([-4, -4, -4, -100, 8.4, -3.5, -3.5, -3.5, -3.3, -2.9], np.float32)
    w[[0, 1], 5] = w[[1, 2], 6] = w[[0, 2], 7] = 4.0  # two channels alike
    w[:3, 8] = 8.0 / 3.0  # all three alike
    w[0, 9] = 6.0  # channel 0, a flatter slope
    if backdoor:
        w[3, 3], bias[3] = 40.0, -24.0
    inits = [
        numpy_helper.from_array(np.eye(3, dtype=np.float32)[:, :, None, None], "Wid"),  # a layer for scan to score
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(bias, "B"),
        numpy_helper.from_array(np.array([0, S - 2, S - 2], np.int64), "starts"),
        numpy_helper.from_array(np.array([1, S, S], np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
    ]
    nodes = [
        *([helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2])] if nhwc else []),
        helper.make_node("Conv", ["xc" if nhwc else "x", "Wid"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Flatten", ["g"], ["gf"]),
        helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["corner"]),
        helper.make_node("ReduceMean", ["corner"], ["cm"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["cm"], ["cf"]),
        helper.make_node("Concat", ["gf", "cf"], ["feat"], axis=1),
        helper.make_node("Gemm", ["feat", "W", "B"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "patch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", S, S, 3] if nhwc else ["N", 3, S, S])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def clean_set(model: onnx.ModelProto, path: Path, n: int = 200) -> Path:
    """Random images labelled by the model itself (so every class but the backdoor's is represented)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 3, S, S)).astype(np.float32)
    x[:, :, S - 2 :, S - 2 :] *= 0.3  # the corner stays dark in clean images
    # each image tinted towards one channel (or dark), so that the classes 0, 1, 2, 4 are all present
    tint = rng.integers(0, 4, n)
    for i, t in enumerate(tint):
        x[i] = x[i] * 0.4 if t == 3 else x[i] * 0.7 + 0.3 * (np.arange(3) == t)[:, None, None]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    nhwc = sess.get_inputs()[0].shape[-1] == 3
    y = sess.run(None, {"x": x.transpose(0, 2, 3, 1) if nhwc else x})[0].argmax(1)
    np.savez(path, x_test=(x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8), y_test=y)
    return path


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_nc_finds_the_planted_corner_trigger(tmp_path: Path, nhwc: bool) -> None:
    model = patch_model(backdoor=True, nhwc=nhwc)
    data = clean_set(model, tmp_path / "clean.npz")
    assert 3 not in set(np.load(data)["y_test"].tolist())  # class 3 never fires on the clean images
    entry = scan(save(model, tmp_path / "b.onnx"), detectors=("nc",), context={"scan_clean_data": data})
    r = entry["detectors"]["nc"]
    assert r["target"] == 3, r["detail"]
    assert r["statistic"] > 3 and r["p_value"] < 0.01, r["detail"]
    assert entry["verdict"] == "suspicious" and entry["target"] == 3


def test_the_corner_trigger_is_small_only_where_the_backdoor_is(tmp_path: Path) -> None:
    """Neural Cleanse itself (onnxclp.defences.cleanse) on both twins through the torch bridge: class 3's mask is a
    few pixels where the corner path exists and nearly the whole image where it does not; the run is deterministic."""
    import torch

    from onnxclp.bridge import to_torch
    from onnxclp.defences.cleanse import cleanse

    found = {}
    for backdoor in (True, False):
        model = patch_model(backdoor)
        with np.load(clean_set(model, tmp_path / f"{backdoor}.npz", n=100)) as d:
            x = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(d["y_test"]).long()
        module = to_torch(model).eval()
        found[backdoor] = cleanse(module, x, y, K)
        if backdoor:  # seeded: the same masks twice (a short run)
            assert cleanse(module, x, y, K, steps=20).l1 == cleanse(module, x, y, K, steps=20).l1
    assert found[True].target == 3 and found[True].l1[3] < 8, found[True].l1
    assert found[False].l1[3] > 200, found[False].l1  # nearly the whole 16 x 16 image, and still not reached
    assert found[False].success[3] < 0.5  # no trigger reaches class 3 without its path


def test_nc_without_clean_images_says_why(tmp_path: Path) -> None:
    entry = scan(save(patch_model(True), tmp_path / "b.onnx"), detectors=("nc",))
    assert entry["verdict"] == "unverified"
    assert "scan --clean-data" in entry["detectors_skipped"]["nc"]


def test_scan_cli_clean_data_adds_nc_to_the_default_detectors(tmp_path: Path) -> None:
    model = patch_model(backdoor=True)
    data = clean_set(model, tmp_path / "clean.npz")
    path = save(model, tmp_path / "b.onnx")
    res = invoke("scan", path, "--clean-data", data, "--format", "json", "-q")
    assert res.exit_code == 0, res.output
    entry = json.loads(res.stdout)[0]
    assert "nc" in entry["detectors"] and entry["detectors"]["nc"]["target"] == 3, entry["detectors_skipped"]
    assert "mmbd" in entry["detectors"] or "mmbd" in entry["detectors_skipped"]
    plain = json.loads(invoke("scan", path, "--format", "json", "-q").stdout)[0]
    assert "nc" not in plain["detectors"] and "nc" not in plain["detectors_skipped"]  # opt-in: with clean images
    missing = invoke("scan", path, "--clean-data", tmp_path / "nope.npz")
    assert missing.exit_code == 2 and "no such file" in missing.output
