"""Small torch models for the tests, and the reference CLP written from docs/algorithms.md, "CLP".

The reference mirrors the public CLP code's ``defense.py``: for each BatchNorm2d, with ``conv`` the Conv2d
*that feeds it* (pairing by data flow, which is what module order gives for these models except the
pre-activation ResNet, where the test pairs explicitly), score ``max singular value of
conv.weight[k].reshape(C_in, -1) * |gamma_k / sqrt(running_var_k + eps)|``, flag ``score > mean + u * std``
(unbiased std), and zero that BN's gamma_k and beta_k.
"""

from __future__ import annotations

import torch
from torch import nn


def train_sgd(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 0.05,
              batch: int = 64) -> nn.Module:  # fmt: skip
    """A few epochs of SGD (momentum 0.9) over ``x`` in order, cross-entropy; returns ``net`` in eval mode."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            loss = torch.nn.functional.cross_entropy(net(x[i : i + batch]), y[i : i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


class VGGBN(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (width, "M", 2 * width, "M", 4 * width, 4 * width):
            if cout == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 4 * 4, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        short = self.short(out) if self.short is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class PreActResNet(nn.Module):
    """Pre-activation ResNet: every block's first BN follows an Add, not a Conv."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(width, width)
        self.layer2 = PreActBlock(width, 2 * width, 2)
        self.bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.conv1(x)))
        x = torch.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0, outliers: int = 2) -> None:
    """Give BatchNorms non-trivial statistics and plant a few large-gamma channels per BN (fake backdoor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                idx = torch.randperm(c, generator=g)[:outliers]
                m.weight[idx] *= 6.0


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """(conv, bn) pairs where the BN directly consumes the conv's output, found by tracing the graph."""
    gm = torch.fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.BatchNorm2d):
            src = node.args[0]
            if src.op == "call_module" and isinstance(mods[src.target], nn.Conv2d) and len(src.users) == 1:
                pairs.append((mods[src.target], mods[node.target]))
    return pairs


def _channel_lips(w: torch.Tensor) -> torch.Tensor:
    # One SVD per channel, as the public code does.
    return torch.stack([torch.linalg.svd(w[k].reshape(w.shape[1], -1))[1].max() for k in range(w.shape[0])])


def reference_clp(
    model: nn.Module, u: float = 3.0, eps: bool = True, unpaired: bool = False
) -> dict[nn.Conv2d, list[int]]:
    """CLP as in the public defense.py, on the model's (conv, BN) pairs; returns {conv: flagged} and edits.

    ``eps=False`` reproduces the public code exactly (no eps in the scale); ``eps=True`` uses the BN's eps as
    the exported, folded weights do. ``unpaired=True`` also scores Convs that feed no BN, with scale 1, and
    zeroes their kernel slices and biases (docs/algorithms.md, "Channels": what onnxclp does, since an export cannot
    tell such a Conv from one whose BN was folded into it).
    """
    flagged: dict[nn.Conv2d, list[int]] = {}
    with torch.no_grad():
        pairs = conv_bn_pairs(model)
        for conv, bn in pairs:
            std = (bn.running_var + (bn.eps if eps else 0.0)).sqrt()
            w = conv.weight * (bn.weight / std).abs().reshape(-1, 1, 1, 1)
            channel_lips = _channel_lips(w)
            th = channel_lips.mean() + u * channel_lips.std()
            idx = torch.nonzero(channel_lips > th).flatten().tolist()
            bn.weight[idx] = 0.0
            bn.bias[idx] = 0.0
            flagged[conv] = idx
        if unpaired:
            paired = {id(c) for c, _ in pairs}
            for conv in model.modules():
                if isinstance(conv, nn.Conv2d) and id(conv) not in paired:
                    channel_lips = _channel_lips(conv.weight)
                    th = channel_lips.mean() + u * channel_lips.std()
                    idx = torch.nonzero(channel_lips > th).flatten().tolist()
                    conv.weight[idx] = 0.0
                    if conv.bias is not None:
                        conv.bias[idx] = 0.0
                    flagged[conv] = idx
    return flagged


def folded_weight(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> torch.Tensor:
    """The Conv weight with its BN folded in, as the exporters write it."""
    if bn is None:
        return conv.weight.detach().clone()
    s = bn.weight / (bn.running_var + bn.eps).sqrt()
    return (conv.weight * s.reshape(-1, 1, 1, 1)).detach()
