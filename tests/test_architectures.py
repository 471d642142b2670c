"""Architectures built in torch with random weights, exported with both exporters (issue: real exports).

For each: sanitize finds every Conv and Linear, skips nothing it should score, writes a model that passes the
full checker, is numerically identical to the input with a huge u, and runs in onnxruntime after pruning.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import onnxclp

torch.set_num_threads(2)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1), InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class DenseNetish(nn.Module):
    """Dense blocks: BN-ReLU-Conv on the concatenation of all previous features."""

    def __init__(self, growth: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList()
        c = 8
        for _ in range(3):
            self.layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1)))
            c += growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        x = torch.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(x.mean(dim=(2, 3)))


class SENet(nn.Module):
    """Conv-BN-ReLU with a squeeze-and-excitation block (Linear layers and a channel-wise Mul)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.se = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x)
        w = self.se(x.mean(dim=(2, 3)))
        x = torch.relu(self.conv2(x * w[:, :, None, None]))
        return self.fc(x.mean(dim=(2, 3)))


class TinyViT(nn.Module):
    """Patch embedding (Conv), 2 transformer blocks (LayerNorm, attention, MLP), a linear head."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x[:, 0]))


ARCHS = {"mobilenetv2": MobileNetV2ish, "densenet": DenseNetish, "senet": SENet, "vit": TinyViT}


def _randomize_bn(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.copy_(0.5 + torch.rand(c, generator=g))
                mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(c, generator=g))


def _linear_count(m: nn.Module) -> int:
    n = sum(isinstance(x, nn.Linear) for x in m.modules())
    # MultiheadAttention holds its q/k/v projection as one (3*dim, dim) parameter plus an out_proj Linear.
    n += sum(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    return n


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_architecture(arch, dynamo, tmp_path):
    torch.manual_seed(0)
    net = ARCHS[arch]().eval()
    _randomize_bn(net)
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(path), dynamo=dynamo, input_names=["x"])
    report = onnxclp.scan(path, method="lpp")
    convs = sum(isinstance(x, nn.Conv2d) for x in net.modules())
    assert sum(layer.op in ("Conv", "ConvTranspose") for layer in report.layers) == convs
    assert sum(layer.op in ("Gemm", "MatMul") for layer in report.layers) == _linear_count(net)
    assert [layer.role for layer in report.layers].count("output") == 1
    for s in report.skipped:  # anything skipped says why
        assert s.reason

    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)

    def outputs(p):
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    same = tmp_path / "same.onnx"
    rep_same = onnxclp.sanitize_file(path, same, method="lpp", u=1e6, u_low=-1e6, bias_rate=0.0)
    assert rep_same.pruned_channels == 0
    np.testing.assert_array_equal(outputs(same), outputs(path))

    pruned = tmp_path / "pruned.onnx"
    rep = onnxclp.sanitize_file(path, pruned, method="lpp", u=1.0, u_low=-1.0)
    onnx.checker.check_model(str(pruned), full_check=True)
    assert rep.pruned_channels > 0
    assert np.all(np.isfinite(outputs(pruned)))
