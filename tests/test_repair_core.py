"""The repair framework (onnxclp.defences.repair): BatchNorm re-inserted and folded back is the identity, a
fine-tuning repair changes initializer values only, and a fixed-batch export trains."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("torch") is None,
    reason="needs the eval extra",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A small ResNet (BatchNorm folded by the TorchScript exporter), the same exported at a fixed batch of 1
    with a view(x.size(0), -1) flatten, and clean data labelled by the model itself."""
    import onnxruntime as ort
    import torch

    from tests.torch_models import SmallResNet, randomize_bn, train_sgd

    folder = tmp_path_factory.mktemp("repair")
    torch.manual_seed(0)
    net = SmallResNet(width=8)
    randomize_bn(net, seed=1, outliers=0)
    xs, ys = stripes(768, seed=1)
    xt, yt = torch.from_numpy(xs.transpose(0, 3, 1, 2) / 255.0).float(), torch.from_numpy(ys).long()
    train_sgd(net, xt, yt, epochs=3)  # a few epochs: the stripe task is easy
    x = torch.rand(2, 3, 32, 32)
    dyn = folder / "dyn.onnx"
    torch.onnx.export(net, x, dyn, dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})  # fmt: skip

    class Flat(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = self.inner
            h = torch.relu(n.bn1(n.conv1(x)))
            h = n.layer3(n.layer2(n.layer1(h)))
            h = torch.nn.functional.adaptive_avg_pool2d(h, 1)
            return n.fc(h.view(h.size(0), -1))

    fixed = folder / "fixed.onnx"
    torch.onnx.export(Flat(net).eval(), x[:1], fixed, dynamo=False, input_names=["x"], output_names=["y"])
    xs, y = stripes(260, seed=2)
    sess = ort.InferenceSession(str(dyn), providers=["CPUExecutionProvider"])
    pred = sess.run(None, {"x": (xs.transpose(0, 3, 1, 2) / 255.0).astype(np.float32)})[0].argmax(1)
    assert (pred == y).mean() > 0.6  # the model learnt the task: a repair can break it
    data = folder / "clean.npz"
    np.savez(data, x_test=xs, y_test=y)
    return dyn, fixed, data


def stripes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class toy task: class k is a bright vertical stripe at column 3k on noise (uint8 NHWC images)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 100, (n, 32, 32, 3))
    for i, k in enumerate(y):
        x[i, :, 3 * k : 3 * k + 3, :] = 255
    return x.astype(np.uint8), y


def test_batchnorm_round_trip_is_the_identity(exported):
    import onnx
    import torch

    from onnxclp.bridge import to_torch
    from onnxclp.defences.repair import fold_batchnorm, insert_batchnorm
    from onnxclp.io import load_model

    model, store = load_model(exported[0])
    module = to_torch(model, store=store).eval()
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        before = module(x)
    inserted = insert_batchnorm(module, torch.rand(64, 3, 32, 32))
    assert len(inserted) == sum(1 for n in model.graph.node if n.op_type == "Conv")
    with torch.no_grad():
        module.eval()
        mid = module(x)
        fold_batchnorm(module, inserted)
        after = module(x)
    assert torch.allclose(before, mid, atol=1e-5, rtol=1e-5)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)
    assert not module.taps_by_name()
    del onnx


def _structure(path: Path) -> tuple:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    nodes = [(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node]
    inits = [(t.name, t.data_type, tuple(t.dims)) for t in m.graph.initializer]
    io = [(v.name, str(v.type)) for v in (*m.graph.input, *m.graph.output)]
    return nodes, inits, io, m.opset_import[0].version, m.ir_version


def test_ft_changes_initializer_values_only_and_reports_them(exported, tmp_path):
    import onnx

    import onnxclp

    src, _, data = exported
    m = onnx.load(str(src))
    m.doc_string = "keep me"
    m.metadata_props.add(key="owner", value="someone")
    src2 = tmp_path / "in.onnx"
    onnx.save(m, src2)
    out = tmp_path / "ft.onnx"
    ctx = {"clean_data": data, "clean_n": 260, "max_acc_drop": 100.0, "quiet": True}
    rep = onnxclp.sanitize_file(src2, out, method="ft", context=ctx, epochs=2)
    assert _structure(out) == _structure(src2)
    got = onnx.load(str(out))
    assert got.doc_string == "keep me"
    assert {p.key: p.value for p in got.metadata_props}["owner"] == "someone"
    assert rep.rewritten and all(r["name"] in {t.name for t in got.graph.initializer} for r in rep.rewritten)
    assert rep.training["chosen_epoch"] in (1, 2) and len(rep.training["curve"]) == 2
    assert (rep.guard["n_val"], rep.guard["n_select"], rep.guard["n_fit"]) == (104, 0, 156)
    assert rep.guard["tested_in_sequence"]  # the run's end was tested in sequence on the validation part
    changed = {r["name"] for r in rep.rewritten}
    before = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for t in got.graph.initializer:
        same = np.array_equal(before[t.name], onnx.numpy_helper.to_array(t))
        assert same == (t.name not in changed)


def test_a_fixed_batch_export_trains_and_runs(exported, tmp_path):
    import onnxruntime as ort

    import onnxclp

    _, fixed, data = exported
    out = tmp_path / "fixed-ft.onnx"
    ctx = {"clean_data": data, "clean_n": 260, "max_acc_drop": 100.0, "quiet": True}
    onnxclp.sanitize_file(fixed, out, method="fst", context=ctx, epochs=1)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)


def test_a_refused_repair_writes_nothing(exported, tmp_path):
    import onnxclp
    from onnxclp.guard import Refused

    src, _, data = exported
    out = tmp_path / "broken.onnx"
    ctx = {"clean_data": data, "clean_n": 260, "max_acc_drop": 0.0, "quiet": True}
    with pytest.raises(Refused) as exc:  # a re-initialised head trained one epoch without distillation
        onnxclp.sanitize_file(src, out, method="fst", context=ctx, epochs=1, lr=0.5, distill=0.0)
    assert exc.value.exit_code == 5 and "nothing written" in exc.value.message
    assert not out.exists()


def test_blend_mixes_each_image_with_another_of_its_batch_deterministically():
    import torch

    from onnxclp.defences.repair import blend

    x = torch.stack([torch.full((3, 4, 4), float(k)) for k in range(8)])
    a = blend(x, torch.Generator().manual_seed(3))
    b = blend(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)  # seeded
    assert a.shape == x.shape
    for img in a:  # a constant image: lam * i + (1 - lam) * j lies between two images' values
        assert torch.allclose(img, img.flatten()[0].expand_as(img))
        assert 0.0 <= float(img[0, 0, 0]) <= 7.0
    assert not torch.equal(a, x)


def test_function_matching_alone_builds_a_teacher_and_is_recorded(exported, tmp_path):
    import onnxclp

    src, _, data = exported
    out = tmp_path / "ft-mix.onnx"
    ctx = {"clean_data": data, "clean_n": 260, "max_acc_drop": 100.0, "quiet": True}
    rep = onnxclp.sanitize_file(src, out, method="ft", context=ctx, epochs=1, distill=0.0, distill_mix=2.0)
    settings = rep.training["settings"]
    assert (settings["distill"], settings["distill_mix"]) == (0.0, 2.0)
    assert rep.rewritten


def test_distillation_focus_weighs_images_by_the_teachers_class():
    """The target gate's focus (``distill_classes``/``distill_other``): an image the teacher gives a focused class
    keeps its distillation term, another's is scaled; all weights 1 is the plain batch-mean term."""
    import torch

    from onnxclp.defences.repair import Settings, focus_weights, kd_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    teacher[:3, 2] += 10  # the first three go to class 2, the others not
    teacher[3:, 2] -= 10
    assert focus_weights(Settings(), teacher) is None
    w = focus_weights(Settings(distill_classes=(2,), distill_other=0.25), teacher)
    assert w is not None and w.tolist() == [1.0, 1.0, 1.0, 0.25, 0.25, 0.25]
    plain = kd_loss(student, teacher, 2.0)
    assert torch.allclose(kd_loss(student, teacher, 2.0, torch.ones(6)), plain)
    per = [float(kd_loss(student[i : i + 1], teacher[i : i + 1], 2.0)) for i in range(6)]
    assert (
        abs(float(kd_loss(student, teacher, 2.0, w)) - sum(p * float(v) for p, v in zip(per, w, strict=True)) / 6)
        < 1e-5
    )
