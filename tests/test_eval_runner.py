"""onnxruntime runner: provider choice, input layout and shape from the model, fixed-batch padding, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from onnxclp.errors import OnnxclpError
from onnxclp.eval.api import evaluate
from onnxclp.eval.attacks import build_attack
from onnxclp.eval.data import ArrayImages
from onnxclp.eval.runner import (
    CPU,
    CUDA,
    InputSpec,
    OnnxClassifier,
    Preprocess,
    _prepare,
    prepared_batches,
    select_providers,
)

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")


def test_select_providers_with_and_without_cuda() -> None:
    with_cuda = ["TensorrtExecutionProvider", CUDA, CPU]
    assert select_providers("auto", with_cuda) == [CUDA, CPU]
    assert select_providers("cuda", with_cuda) == [CUDA, CPU]
    assert select_providers("cpu", with_cuda) == [CPU]
    assert select_providers("auto", [CPU]) == [CPU]
    assert select_providers("AUTO", ["AzureExecutionProvider", CPU]) == [CPU]
    with pytest.raises(OnnxclpError, match="--device cuda: this onnxruntime has no CUDAExecutionProvider") as info:
        select_providers("cuda", [CPU])
    assert "'eval-gpu' extra (onnxruntime-gpu)" in info.value.message and "\n" not in info.value.message
    with pytest.raises(OnnxclpError, match="--device must be one of auto, cpu, cuda"):
        select_providers("tpu", [CPU])


def test_input_spec_from_model_shapes() -> None:
    nchw = InputSpec.from_shape("x", ["batch", 3, 32, 32], "tensor(float)")
    assert (nchw.layout, nchw.batch, nchw.channels, nchw.height, nchw.width) == ("nchw", None, 3, 32, 32)
    nhwc = InputSpec.from_shape("x", [8, 224, 224, 3], "tensor(float)")
    assert (nhwc.layout, nhwc.batch, nhwc.channels, nhwc.height, nhwc.width) == ("nhwc", 8, 3, 224, 224)
    dynamic = InputSpec.from_shape("x", [None, "c", "h", "w"], "tensor(float16)")
    assert (dynamic.layout, dynamic.channels, dynamic.dtype) == ("nchw", None, np.float16)
    forced = InputSpec.from_shape("x", ["n", "h", "w", "c"], "tensor(float)", layout="nhwc")
    assert forced.layout == "nhwc"
    with pytest.raises(OnnxclpError, match="has rank 2"):
        InputSpec.from_shape("x", [1, 10], "tensor(float)")
    assert InputSpec.from_shape("x", [1, 3, 8, 8], "tensor(uint8)").dtype == np.uint8  # pixels 0..255
    with pytest.raises(OnnxclpError, match="type tensor\\(int32\\); evaluate needs a float or 8-bit"):
        InputSpec.from_shape("x", [1, 3, 8, 8], "tensor(int32)")


def test_an_integer_input_is_fed_rounded_pixels() -> None:
    from onnxclp.eval.runner import as_dtype

    x = np.array([0.0, 254.9999, 127.5000001, 300.0, -3.0], np.float32)
    assert as_dtype(x, np.uint8).tolist() == [0, 255, 128, 255, 0]
    assert as_dtype(x, np.float32) is x


class TinyNet(nn.Module):
    def __init__(self, nhwc: bool = False, classes: int = 4) -> None:
        super().__init__()
        self.nhwc = nhwc
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.conv(x)).amax(dim=(2, 3)))


def export(model: nn.Module, path, shape: tuple[int, ...], dynamic: bool = True) -> None:
    kwargs = {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}} if dynamic else {}
    torch.onnx.export(
        model.eval(), torch.zeros(shape), str(path), input_names=["x"], output_names=["y"], dynamo=False, **kwargs
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("runner_models")
    torch.manual_seed(0)
    net = TinyNet()
    nhwc = TinyNet(nhwc=True)
    nhwc.load_state_dict(net.state_dict())
    export(net, root / "dynamic.onnx", (1, 3, 8, 8))
    export(net, root / "fixed4.onnx", (4, 3, 8, 8), dynamic=False)
    export(nhwc, root / "nhwc.onnx", (1, 8, 8, 3))
    return net, root


def images(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_fixed_batch_model_gets_padded_batches(models) -> None:  # type: ignore[no-untyped-def]
    net, root = models
    fixed = OnnxClassifier(root / "fixed4.onnx", device="cpu")
    assert fixed.input.batch == 4 and fixed.provider == CPU
    x = (torch.from_numpy(images(10)).permute(0, 3, 1, 2).float() / 255).numpy()
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).argmax(1).numpy()
    assert np.array_equal(fixed.predict(x), expected)  # 10 = 4 + 4 + 2 padded to 4
    dynamic = OnnxClassifier(root / "dynamic.onnx")
    assert dynamic.input.batch is None
    assert np.array_equal(dynamic.predict(x), expected)


def test_nhwc_model_layout_is_read_from_the_model(models) -> None:  # type: ignore[no-untyped-def]
    _, root = models
    nhwc = OnnxClassifier(root / "nhwc.onnx")
    assert nhwc.input.layout == "nhwc" and nhwc.input.channels == 3
    y = np.arange(10) % 4
    np.savez(root / "d.npz", x_test=images(10), y_test=y)
    results = [
        evaluate(root / name, root / "d.npz", "badnets", params={"size": 2}, batch_size=3)
        for name in ("dynamic.onnx", "fixed4.onnx", "nhwc.onnx")
    ]
    assert len({(r.acc, r.asr, r.ra, r.n_samples, r.n_attacked) for r in results}) == 1
    assert results[0].n_samples == 10 and results[0].n_attacked == int((y != 0).sum())
    assert results[2].input["layout"] == "nhwc"


def test_trigger_is_applied_before_normalisation() -> None:
    x = np.zeros((2, 3, 4, 4), np.uint8)
    data = ArrayImages(x, np.array([1, 0]), "chw", "zeros")
    pre = Preprocess(mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 2.0])
    batch = _prepare(data, np.arange(2), build_attack("badnets", {"size": 1}), 0, "a2o", pre, keep_raw=False)
    assert batch.y_attacked.tolist() == [1]  # a2o: the target-class sample is not triggered
    assert batch.triggered is not None and batch.triggered.shape == (1, 3, 4, 4)
    assert np.allclose(batch.triggered[0, :, 3, 3], [(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, (1 - 0.0) / 2.0])
    assert np.allclose(batch.clean[:, :, 0, 0], [[-1.0, -1.0, 0.0]] * 2)


def test_resize_happens_before_the_trigger() -> None:
    data = ArrayImages(np.zeros((1, 16, 16, 3), np.uint8), np.array([1]), "hwc", "zeros")
    batch = _prepare(data, np.arange(1), build_attack("badnets"), 0, "a2o", Preprocess(size=(8, 8)), False)
    assert batch.triggered is not None and batch.triggered.shape == (1, 3, 8, 8)
    assert batch.triggered[0, :, 5:, 5:].min() == 1.0  # a 3×3 patch at the new size, not a shrunk one


class _Broken(ArrayImages):
    def images(self, idx: np.ndarray) -> torch.Tensor:
        if idx[0] >= 4:
            raise OnnxclpError("disk on fire")
        return super().images(idx)


def test_prefetching_keeps_order_and_passes_errors_on() -> None:
    x = images(10)
    data = ArrayImages(x, np.arange(10) % 3, "hwc", "ten")
    got = [b.y.tolist() for b in prepared_batches(data, np.arange(10), 3, None, 0, "a2o", Preprocess())]
    assert got == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [0]]
    broken = _Broken(x, np.arange(10) % 3, "hwc", "broken")
    with pytest.raises(OnnxclpError, match="disk on fire"):
        list(prepared_batches(broken, np.arange(10), 2, None, 0, "a2o", Preprocess()))


def test_missing_and_corrupt_models(tmp_path) -> None:
    with pytest.raises(OnnxclpError, match="no such model file"):
        OnnxClassifier(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(OnnxclpError, match="not a valid ONNX model"):
        OnnxClassifier(tmp_path / "junk.onnx")


def test_example_images_come_from_the_first_batch_with_attacked_samples() -> None:
    y = np.array([0, 0, 0, 0, 1, 2, 1])  # sorted by class, as CIFAR-10's test set: batch 1 is all target
    data = ArrayImages(images(7), y, "hwc", "sorted")
    batches = list(
        prepared_batches(data, np.arange(7), 3, build_attack("bpp"), 0, "a2o", Preprocess(), keep_raw_first=True)
    )
    assert [b.raw_clean is not None for b in batches] == [False, True, False]
    assert batches[1].raw_clean is not None and batches[1].raw_clean.shape[0] == 2
