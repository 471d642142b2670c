"""The torch models the benchmarks export (random weights): basic-block ResNets with a CIFAR or an ImageNet stem.

Shared by ``bench/scale.py`` and ``bench/evaluate_speed.py``; imports torch (the benches that need no torch use
``bench/_models.py``, built with onnx.helper).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Block(nn.Module):
    """A basic residual block: two 3x3 conv-BN, a 1x1 conv-BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class ResNet(nn.Module):
    """``blocks`` basic blocks per stage of ``widths`` (stride 2 entering each stage after the first), global
    average pool, one FC layer. ``imagenet``: the 7x7 stride-2 stem with max pooling, else CIFAR's 3x3 stem."""

    def __init__(self, widths: Sequence[int], blocks: int, classes: int = 10, imagenet: bool = False) -> None:
        super().__init__()
        w0 = widths[0]
        if imagenet:
            stem = [nn.Conv2d(3, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        else:
            stem = [nn.Conv2d(3, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        cin = w0
        for i, cout in enumerate(widths):
            for j in range(blocks):
                layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def cifar_resnet(width: int = 16, blocks: int = 3, classes: int = 10) -> ResNet:
    """CIFAR ResNet with widths w, 2w, 4w (ResNet-20: width 16, blocks 3)."""
    return ResNet((width, 2 * width, 4 * width), blocks, classes)


def randomize_bn(net: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, as a trained model has."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
