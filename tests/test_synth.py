"""Synthesized stand-in data (onnxclp.defences.synth, ``--clean-data synthetic[:N]``, issue 21): seeded and
deterministic on the CPU, BatchNorm statistics matched where the graph kept them, the repairs run on it, the guard
reports agreement with the input model and the share of changed predictions, ``--save-synthetic`` writes the set
and a picture."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxclp.errors import OnnxclpError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("torch") is None,
    reason="needs the eval extra",
)

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
FAST = {"synth_steps": 4, "synth_batch": 80}  # a few steps: the tests check the plumbing, not the images


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A small ResNet trained for a moment on a 10-class stripe task (class k: a bright stripe at column 3k),
    exported with BatchNorm folded (the TorchScript default) and with BatchNorm kept."""
    import torch

    from tests.torch_models import SmallResNet, train_sgd

    folder = tmp_path_factory.mktemp("synth")
    torch.manual_seed(0)
    net = SmallResNet(width=8)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, 320)
    x = rng.integers(0, 100, (320, 3, 32, 32)).astype(np.float32)
    for i, k in enumerate(y):
        x[i, :, :, 3 * k : 3 * k + 3] = 255
    xt = (torch.from_numpy(x / 255.0) - 0.5) / 0.25
    yt = torch.from_numpy(y).long()
    train_sgd(net, xt, yt, epochs=2)
    folded, kept = folder / "folded.onnx", folder / "kept.onnx"
    dummy = torch.zeros(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {"dynamo": False, "input_names": ["x"], "output_names": ["y"], "dynamic_axes": {"x": {0: "n"}}}
        torch.onnx.export(net, dummy, folded, **kw)
        torch.onnx.export(net, dummy, kept, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          **kw)  # fmt: skip
    return folded, kept


def _synth(path: Path, **kw: object):
    from onnxclp.bridge import load
    from onnxclp.defences.synth import SynthSettings, synthesize

    settings = SynthSettings(**{"n": 20, "steps": 2, "batch": 20, **kw})  # type: ignore[arg-type]
    return synthesize(load(path), (3, 32, 32), settings, mean=MEAN, std=STD)


def test_synthesis_is_seeded_and_deterministic(models):
    folded, kept = models
    a, b = _synth(kept), _synth(kept)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(a.x, _synth(kept, seed=1).x)
    assert a.x.shape == (20, 3, 32, 32) and a.x.dtype == np.float32
    assert a.x.min() >= 0.0 and a.x.max() <= 1.0
    assert np.array_equal(np.round(a.x * 255) / 255, a.x)  # 8-bit values: what --save-synthetic writes
    assert np.bincount(a.targets, minlength=10).tolist() == [2] * 10  # class-balanced targets
    assert a.info["batchnorm_layers_matched"] > 0  # BatchNormalization kept: its statistics are matched
    assert _synth(folded).info["batchnorm_layers_matched"] == 0  # folded: priors only
    noise = _synth(folded, mode="noise")
    assert noise.info["mode"] == "noise" and noise.x.shape == a.x.shape


def test_parse_spec():
    from onnxclp.defences.synth import DEFAULT_N, parse_spec

    assert parse_spec("synthetic") == (DEFAULT_N, {}) and DEFAULT_N == 1000
    assert parse_spec("synthetic:500") == (500, {})
    assert parse_spec("synthetic:500,steps=20,mode=noise,flip=false") == (500, {"steps": 20, "mode": "noise",
                                                                              "flip": False})  # fmt: skip
    assert parse_spec("synthetic,lr=0.2") == (1000, {"lr": 0.2})
    for bad in ("synthetic:x", "synthetic:0", "data.npz", "synthetic:10,n=3", "synthetic,steps=a", "synthetics"):
        with pytest.raises(OnnxclpError):
            parse_spec(bad)


def _repairs() -> list[str]:
    from onnxclp import methods
    from onnxclp.methods._repair import RepairMethod

    return [n for n in methods.names() if isinstance(methods.get(n), RepairMethod)]


@pytest.mark.parametrize("method", _repairs())
def test_repairs_run_on_synthetic_data(models, method, tmp_path):
    """Issue 21.2: every repair runs on synthesized data, the guard reporting agreement with the input model."""
    from onnxclp.api import sanitize_file

    folded, kept = models
    src = kept if method == "bnp-ac" else folded  # BNP's stage reads BatchNorm statistics: the BN-kept export
    out = tmp_path / "out.onnx"
    context = {"clean_data": "synthetic:150", "mean": MEAN, "std": STD, "max_acc_drop": 100.0, "quiet": True,
               "device": "cpu", **FAST}  # fmt: skip
    extra = {"fst_alpha": 0.2} if method in ("fst-head", "clp-npd-fst") else {}  # one run, not the alpha walk
    if method in ("ac", "bnp-ac", "sau-ac"):
        extra = {"ac_weight": 1.0}  # one run, not the weight walk
    if method == "sau-ac":
        extra["sau_epochs"] = 1
    rep = sanitize_file(src, out, method, context=context, epochs=1, **extra)
    g = rep.guard
    assert g["metric"] == "agreement with the input model"
    assert g["acc_before"] == 1.0  # the labels are the input model's own (onnxruntime)
    assert g["n_val"] == 100 and g["n_fit"] == 50
    assert g["changed_predictions"] is not None
    assert g["acc_after"] == pytest.approx(1.0 - g["changed_predictions"])
    assert "synthesized from the input model" in g["data"]
    assert any("changed its predicted class" in n for n in rep.notes)
    before, after = onnx.load(src), onnx.load(out)
    assert len(after.graph.node) == len(before.graph.node) + len(rep.added_nodes)  # NPD's: exactly one Conv
    ops = [n.op_type for n in after.graph.node if n.name not in rep.added_nodes]
    assert [n.op_type for n in before.graph.node] == ops  # otherwise weights only


def test_too_few_synthetic_images_is_a_usage_error(models, tmp_path):
    from onnxclp.api import sanitize_file

    with pytest.raises(OnnxclpError, match="at least 120"):
        sanitize_file(models[0], tmp_path / "o.onnx", "ft", context={"clean_data": "synthetic:50", "quiet": True})


def test_cli_save_synthetic_and_agreement_in_report(models, tmp_path):
    folded, _ = models
    out, report, pics = tmp_path / "out.onnx", tmp_path / "r.json", tmp_path / "pics"
    r = subprocess.run(
        [sys.executable, "-m", "onnxclp", "sanitize", str(folded), str(out), "--method", "ft", "--epochs", "1",
         "--clean-data", "synthetic:120,steps=2", "--save-synthetic", str(pics), "--max-acc-drop", "100",
         "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--report", str(report), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    err = " ".join(r.stderr.split())
    assert "agreement with the input model" in err and "changed its predicted class" in err
    with np.load(pics / "synthetic.npz") as z:
        assert z["x_test"].dtype == np.uint8 and z["x_test"].shape == (120, 32, 32, 3)
        assert z["y_test"].shape == (120,)
        assert int(z["validation"].sum()) == 100  # the guard's validation images: procedural, not optimised
    from PIL import Image

    with Image.open(pics / "synthetic.png") as img:
        assert img.width > 8 * 32 and img.height >= 32
    g = json.loads(report.read_text())["guard"]
    assert g["metric"] == "agreement with the input model" and g["changed_predictions"] is not None
    bad = subprocess.run(
        [sys.executable, "-m", "onnxclp", "sanitize", str(folded), str(tmp_path / "o2.onnx"), "--save-synthetic",
         str(pics)], capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--save-synthetic needs --clean-data synthetic" in bad.stderr


def test_a_saved_synthetic_set_reads_back_with_its_own_split(models, tmp_path):
    """The set --save-synthetic wrote, given back with --clean-data: its procedural images stay the guard's
    validation part (not a random split that would validate on inverted images), it is read whole (no --clean-n
    subset), and the model being repaired labels it again (here the BN-kept export, which did not make it)."""
    from onnxclp.api import sanitize_file
    from onnxclp.passes.guard import saved_synthetic_mask

    folded, kept = models
    pics = tmp_path / "pics"
    context = {"clean_data": "synthetic:130", "mean": MEAN, "std": STD, "max_acc_drop": 100.0, "quiet": True,
               "device": "cpu", "save_synthetic": pics, **FAST}  # fmt: skip
    first = sanitize_file(folded, tmp_path / "a.onnx", "ft", context=context, epochs=1).guard
    npz = pics / "synthetic.npz"
    assert saved_synthetic_mask(npz) is not None and saved_synthetic_mask(tmp_path / "other.npz") is None
    again = {"clean_data": npz, "clean_n": 50, "mean": MEAN, "std": STD, "max_acc_drop": 100.0, "quiet": True,
             "device": "cpu"}  # fmt: skip
    g = sanitize_file(kept, tmp_path / "b.onnx", "ft", context=again, epochs=1).guard
    assert (g["n_fit"], g["n_val"]) == (first["n_fit"], first["n_val"]) == (30, 100)
    assert g["metric"] == "agreement with the input model" and g["acc_before"] == 1.0
    assert "read back from" in g["data"]
    z = dict(np.load(npz))
    z["validation"] = z["validation"].astype(np.int64)  # not a boolean column: a clear error, not a guess
    np.savez(tmp_path / "bad.npz", **z)
    with pytest.raises(OnnxclpError, match="1-D boolean"):
        sanitize_file(kept, tmp_path / "c.onnx", "ft", context={**again, "clean_data": tmp_path / "bad.npz"})


def test_a_model_that_puts_every_synthesized_image_in_one_class_is_refused(tmp_path):
    """resnet-bpp's case (session 10): the input model labels every synthesized image its backdoor's target, so a
    repair collapsed to that class agrees with all of them; the guard says it cannot check, exit 5, nothing
    written."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxclp.api import sanitize_file
    from onnxclp.errors import EXIT_REFUSED

    rng = np.random.default_rng(0)
    b = np.zeros(10, np.float32)
    b[0] = 20.0  # class 0 whatever the image
    g = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)],
        "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(rng.normal(0, 0.1, (10, 3)).astype(np.float32), "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    src, out = tmp_path / "one.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    context = {"clean_data": "synthetic:120", "quiet": True, "device": "cpu", **FAST}
    with pytest.raises(OnnxclpError, match="cannot show a model is not broken") as exc:
        sanitize_file(src, out, "ft", context=context, epochs=1)
    assert exc.value.exit_code == EXIT_REFUSED and not out.exists()
