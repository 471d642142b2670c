"""Run options, the one device rule, the shared batch loop and metrics type, WaNet grid kinds, .npy trigger
images, TAC on the scan's layers (issues 11.5 and 15.4)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from builders import conv_bn, model
from onnx import helper
from torch import nn

from onnxclp.errors import OnnxclpError
from onnxclp.eval import Metrics, RunOptions, compare, evaluate, prepare_run, resolve_device
from onnxclp.eval.attacks import ATTACKS, Attack, WaNet, build_attack, register
from onnxclp.eval.attacks.wanet import grid_kind_of, identity_grid
from onnxclp.eval.runner import OnnxClassifier

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("options")
    torch.manual_seed(0)
    net = Net().eval()
    for name, shape, dyn in (("m.onnx", (1, 3, 16, 16), True), ("fixed.onnx", (4, 3, 16, 16), False)):
        kwargs = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dyn else {}
        torch.onnx.export(
            net, torch.zeros(shape), str(root / name), input_names=["x"], output_names=["y"], dynamo=False, **kwargs
        )
    rng = np.random.default_rng(0)
    np.savez(
        root / "d.npz", x_test=rng.integers(0, 256, (50, 16, 16, 3), dtype=np.uint8), y_test=rng.integers(0, 4, 50)
    )
    return root


# ---------------------------------------------------------------------------------------------------- device rule


def test_device_rule_is_case_insensitive_and_strict() -> None:
    assert [resolve_device(d) for d in ("auto", "CPU", "Cuda", " cuda ")] == ["auto", "cpu", "cuda", "cuda"]
    for bad in ("tpu", "", None, 1):
        with pytest.raises(OnnxclpError, match="--device must be one of auto, cpu, cuda"):
            resolve_device(bad)
    assert RunOptions(device="CPU").device == "cpu"
    with pytest.raises(OnnxclpError, match="--device must be one of"):
        RunOptions(device="gpu")


def test_uppercase_cuda_never_runs_silently_on_the_cpu(files) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    for entry in (
        lambda: OnnxClassifier(files / "m.onnx", device="CUDA"),
        lambda: evaluate(files / "m.onnx", files / "d.npz", device="CUDA"),
    ):
        with pytest.raises(OnnxclpError, match="--device cuda: this onnxruntime has no CUDAExecutionProvider"):
            entry()


def test_run_options_reject_unknown_names_and_bad_values() -> None:
    with pytest.raises(TypeError, match="unknown run option"):
        RunOptions().replace(batchsize=3)
    with pytest.raises(TypeError, match="unknown run option"):
        evaluate("m.onnx", "d.npz", batchsize=3)
    with pytest.raises(OnnxclpError, match="--batch-size must be >= 1"):
        RunOptions(batch_size=0)
    assert RunOptions.build(RunOptions(limit=5), batch_size=7) == RunOptions(limit=5, batch_size=7)


# ---------------------------------------------------------------------------------------------------- one loop


def test_evaluate_and_compare_share_options_loop_and_metrics(files) -> None:
    opts = RunOptions(attack="badnets", batch_size=8, device="cpu", limit=40)
    e = evaluate(files / "m.onnx", files / "d.npz", options=opts)
    c = compare(files / "m.onnx", files / "fixed.onnx", files / "d.npz", options=opts)
    assert isinstance(e.metrics, Metrics) and isinstance(c.original_metrics, Metrics)
    assert e.metrics.to_dict() == c.original_metrics.to_dict() == c.sanitized_metrics.to_dict()
    assert c.agreement == 1.0 and c.triggered_agreement == 1.0
    assert e.n_samples == 40 and c.images == 2 * e.images
    # keyword arguments are the same fields
    k = evaluate(files / "m.onnx", files / "d.npz", "badnets", batch_size=8, device="cpu", limit=40)
    assert k.metrics.to_dict() == e.metrics.to_dict()
    d = e.to_dict()
    assert {"acc", "asr", "ra", "clean_correct", "attack_hits", "attack_robust", "n_samples"} <= set(d)
    json.dumps(c.to_dict())


def test_prepare_run_is_public_and_used_by_study(files) -> None:
    from onnxclp.study.measure import measure, prepare

    run = prepare_run([files / "m.onnx"], files / "d.npz", RunOptions(attack="blended", batch_size=16, device="cpu"))
    assert run.num_classes == 4 and len(run.indices) == 50 and run.has_trigger
    assert sum(len(b.y) for b in run.batches()) == 50
    prepared = prepare(files / "m.onnx", files / "d.npz", options=run.options)
    m = measure(files / "m.onnx", prepared)
    e = evaluate(files / "m.onnx", files / "d.npz", options=run.options)
    assert isinstance(m, Metrics) and m.to_dict() == e.metrics.to_dict()


# ---------------------------------------------------------------------------------------------------- registry


def test_attack_registry_is_one_module_per_attack() -> None:
    import pkgutil

    import onnxclp.eval.attacks as pkg
    from onnxclp.cli.eval import attack_names

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - {"base"}
    assert set(ATTACKS) == modules == set(attack_names())
    assert next(iter(ATTACKS)) == "none"
    with pytest.raises(ValueError, match="registered twice"):

        @register
        class Again(Attack):  # pragma: no cover - refused
            name = "badnets"
            defaults: dict = {}  # noqa: RUF012

            def _validate(self) -> None: ...

            def _apply(self, x: torch.Tensor) -> torch.Tensor:
                return x


# ---------------------------------------------------------------------------------------------------- WaNet grids


def _x(n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_wanet_sampling_grid_is_recognised_and_used_as_is(tmp_path) -> None:
    ref = WaNet({"s": 2.0}, seed=3)
    np.save(tmp_path / "sampling.npy", ref.warp_grid(16, 16)[0].numpy().astype(np.float32))
    got = WaNet({"grid": str(tmp_path / "sampling.npy")})
    assert got.params["grid_kind"] == "sampling"
    torch.testing.assert_close(got.apply(_x()), ref.apply(_x()), atol=1e-6, rtol=0)
    explicit = WaNet({"grid": str(tmp_path / "sampling.npy"), "grid_kind": "sampling"})
    assert torch.equal(explicit.apply(_x()), got.apply(_x()))
    with pytest.raises(OnnxclpError, match="16×16 sampling grid but images are 8×8"):
        got.apply(_x(size=8))


def test_wanet_noise_grid_is_recognised(tmp_path) -> None:
    ref = WaNet({"s": 0.5}, seed=3)
    noise = torch.nn.functional.interpolate(ref.field(), size=(16, 16), mode="bicubic", align_corners=True)
    np.save(tmp_path / "noise.npy", noise.permute(0, 2, 3, 1).numpy())
    got = WaNet({"grid": str(tmp_path / "noise.npy")}, seed=99)
    assert got.params["grid_kind"] == "noise"
    torch.testing.assert_close(got.apply(_x()), ref.apply(_x()), atol=1e-6, rtol=0)
    assert grid_kind_of(identity_grid(16, 16)) == "sampling"


def test_wanet_ambiguous_grid_is_refused_unless_the_kind_is_given(tmp_path) -> None:
    arr = np.random.default_rng(0).uniform(-1, 1, (16, 16, 2)).astype(np.float32)  # neither evident
    np.save(tmp_path / "g.npy", arr)
    with pytest.raises(OnnxclpError, match=r"could be a sampling grid or a noise grid.*--grid-kind"):
        WaNet({"grid": str(tmp_path / "g.npy")})
    for kind in ("noise", "sampling"):
        assert WaNet({"grid": str(tmp_path / "g.npy"), "grid_kind": kind}).apply(_x()).shape == (4, 3, 16, 16)
    with pytest.raises(OnnxclpError, match="grid_kind field needs a \\(2, k, k\\) array"):
        WaNet({"grid": str(tmp_path / "g.npy"), "grid_kind": "field"})
    with pytest.raises(OnnxclpError, match="grid_kind must be one of"):
        WaNet({"grid": str(tmp_path / "g.npy"), "grid_kind": "warp"})
    with pytest.raises(OnnxclpError, match=r"needs params\.grid"):
        WaNet({"grid_kind": "noise"})


def test_cli_grid_kind_option(files, tmp_path) -> None:
    arr = np.random.default_rng(0).uniform(-1, 1, (16, 16, 2)).astype(np.float32)
    np.save(tmp_path / "g.npy", arr)
    base = [sys.executable, "-m", "onnxclp", "evaluate", str(files / "m.onnx"), "--data", str(files / "d.npz")]
    base += ["--attack", "wanet", "--grid", str(tmp_path / "g.npy"), "--device", "CPU", "--json", "-"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--grid-kind" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([*base, "--grid-kind", "sampling"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["attack"]["params"]["grid_kind"] == "sampling"


# ---------------------------------------------------------------------------------------------------- .npy images


def test_trigger_image_may_be_a_npy_array(tmp_path) -> None:
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "t.png")
    np.save(tmp_path / "hwc.npy", rgb)
    np.save(tmp_path / "chw.npy", rgb.transpose(2, 0, 1).astype(np.float32) / 255)
    x = _x(size=16)
    for attack in ("badnets", "blended", "patch"):
        want = build_attack(attack, {"image": str(tmp_path / "t.png")}).apply(x)
        for f in ("hwc.npy", "chw.npy"):
            got = build_attack(attack, {"image": str(tmp_path / f)}).apply(x)
            torch.testing.assert_close(got, want, atol=1e-2 if attack == "blended" else 1e-6, rtol=0)
    np.save(tmp_path / "bad.npy", np.full((5, 5, 3), 2.0))
    with pytest.raises(OnnxclpError, match="uint8 or float values in \\[0, 1\\]"):
        build_attack("badnets", {"image": str(tmp_path / "bad.npy")}).apply(x)


# ---------------------------------------------------------------------------------------------------- TAC


def test_tac_takes_the_layers_from_the_scan_report() -> None:
    from onnxclp.api import scan
    from onnxclp.graph import GraphIndex
    from onnxclp.io import TensorStore
    from onnxclp.layers import find_layers
    from onnxclp.study.tac import report_outputs

    w = np.random.default_rng(0).normal(size=(8, 3, 3, 3)).astype(np.float32)
    m = conv_bn(w, gamma=np.ones(8))
    fc = model(
        [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), helper.make_node("Add", ["mm", "b"], ["y"])],
        [("x", [2, 6])],
        [("y", [2, 5])],
        [
            onnx.numpy_helper.from_array(np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32), "W"),
            onnx.numpy_helper.from_array(np.ones(5, np.float32), "b"),
        ],
    )
    for proto in (m, fc):
        report = scan(proto, "clp", include_fc=True, force=True)
        found = {lay.key: lay for lay in find_layers(GraphIndex(proto.graph), TensorStore(proto, None)).layers}
        got = report_outputs(proto.graph, report.layers)
        assert got and {k: t for k, (t, _) in got.items()} == {k: found[k].output for k in got}
