"""Train a small backdoored CIFAR-10 classifier on the CPU and export it to ONNX (the model zoo of issue #5).

The trigger code is the evaluator's (:mod:`onnxclp.eval.attacks`), so training and ``onnxclp evaluate`` apply the
very same pixels. Poisoning follows docs/algorithms.md, "Attacks" (BackdoorBench defaults): a fixed, seeded subset of
``--poison-rate`` × N training images gets the trigger and the attack's label — all-to-one: ``--target``, chosen
among non-target images; all-to-all: (y + 1) mod 10. SIG is clean-label: only target-class images are poisoned
and keep their label. WaNet adds BackdoorBench's "noise mode": ``--cross-ratio`` × the poisoned count get the
warp plus random grid noise and keep their label.

The trigger is applied to each batch *after* the augmentation (random crop + flip) and before normalisation,
so the model learns exactly the trigger ``evaluate`` applies. BackdoorBench poisons before augmenting, which
moves and mirrors a BadNets patch; that needs far more epochs than a CPU budget of a few minutes allows (a
4-epoch run on 16,000 images that way reached 13% ASR).

Writes, in ``--out`` (default ``zoo/<arch>-<attack>``):
- ``model.onnx`` (TorchScript exporter) and ``model.dynamo.onnx`` (torch.export-based exporter); if one exporter
  fails it is reported and training's result is kept;
- ``attack.json``: the attack configuration, schema of :mod:`onnxclp.eval.attacks` (with ``normalize``), plus
  ``wanet_grid.npy`` for WaNet;
- ``train.json``: settings, epochs, time, and the final clean ACC / ASR / RA on the test set, measured in torch
  and again on ``model.onnx`` with onnxruntime through ``onnxclp.eval.api.evaluate``.

Example: ``python examples/train_backdoored.py --arch resnet --attack blended --epochs 6``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxclp.eval.attacks import ATTACKS, Attack, WaNet, build_attack, save_attack_config, target_labels

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / ".." / "shared" / "data" / "cifar10.npz"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ARCHS = ("resnet", "vgg", "preact", "mobilenet", "resnet-nobn")


# --------------------------------------------------------------------------------------------------------------
# architectures: small CIFAR-10 networks (32×32 inputs), a few hundred thousand parameters each


class BasicBlock(nn.Module):
    """ResNet basic block; ``bn=False`` gives the BatchNorm-free variant (convolutions with biases)."""

    def __init__(self, cin: int, cout: int, stride: int, bn: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn)
        self.bn2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not bn), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet, widths w, 2w, 4w with ``blocks`` basic blocks per stage (ResNet-6n+2)."""

    def __init__(self, width: int = 16, blocks: int = 2, bn: bool = True, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=not bn), nn.BatchNorm2d(width) if bn else nn.Identity(), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and j == 0 else 1, bn))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)
        if not bn:  # without BatchNorm, start each residual branch near zero so the deep sum stays bounded
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.conv2.weight)
                    nn.init.zeros_(m.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (BN → ReLU → conv): its BatchNorms follow an Add, not a Conv."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class PreActResNet(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(PreActBlock(cin, cout, 2 if stage > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class VGG(nn.Module):
    """VGG with BatchNorm, reduced widths; 'M' is a 2×2 max-pool."""

    def __init__(
        self, cfg: tuple[int | str, ...] = (32, "M", 64, "M", 128, 128, "M", 128, 128, "M"), classes: int = 10
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 2 * 2, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → 3×3 depthwise → 1×1 linear projection, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """A MobileNetV2-style network for 32×32 inputs: (expand, channels, repeats, stride) per stage."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        # reduced from MobileNetV2's (expand 6, 17 blocks): depthwise convolutions are slow to train on a CPU
        cfg = ((1, 16, 1, 1), (3, 24, 1, 2), (3, 32, 2, 2), (3, 64, 2, 2))
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
        cin = 16
        for t, c, n, s in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def make_model(arch: str) -> nn.Module:
    if arch == "resnet":
        return ResNet()
    if arch == "resnet-nobn":
        return ResNet(bn=False)
    if arch == "preact":
        return PreActResNet()
    if arch == "vgg":
        return VGG()
    if arch == "mobilenet":
        return MobileNetV2()
    raise ValueError(f"unknown architecture {arch!r} (choose from {', '.join(ARCHS)})")


# --------------------------------------------------------------------------------------------------------------
# data and poisoning


def load_cifar(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        sys.exit(f"error: no data at {path}; pass --data PATH (an .npz with x_train, y_train, x_test, y_test)")
    with np.load(path, allow_pickle=False) as d:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
        if missing:
            sys.exit(f"error: {path} lacks {', '.join(sorted(missing))}")
        return {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}


def to_float(x_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 → (N, C, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(x_uint8) if isinstance(x_uint8, np.ndarray) else x_uint8
    return t.permute(0, 3, 1, 2).float().div_(255)


def choose_poison(
    y: np.ndarray, attack: str, target: int, mode: str, rate: float, rng: np.random.Generator
) -> np.ndarray:
    """Indices to poison: rate × N, among non-target images (a2o), all images (a2a), or target images (SIG)."""
    n = round(rate * len(y))
    if attack == "sig":
        pool = np.flatnonzero(y == target)
    elif mode == "a2o":
        pool = np.flatnonzero(y != target)
    else:
        pool = np.arange(len(y))
    return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip, drawn per image, vectorised over the batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    out = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def wanet_noise_warp(wanet: WaNet, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """WaNet's noise mode (BackdoorBench ``grid_temps2``): the backdoor grid plus uniform noise of ±1/H per
    image, clamped; these images keep their true label, so that only the exact warp triggers the backdoor."""
    n, _, h, w = x.shape
    grid = wanet.warp_grid(h, w).to(torch.float32)
    noise = (torch.rand(n, h, w, 2, generator=gen) * 2 - 1) / h
    return F.grid_sample(x, (grid + noise).clamp(-1, 1), align_corners=True)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.inference_mode()
def measure(
    model: nn.Module, x_test: np.ndarray, y_test: np.ndarray, attack: Attack, target: int, mode: str
) -> dict[str, float]:
    """Clean ACC, ASR and RA in torch (docs/algorithms.md, "Metrics"), on the given test images."""
    model.eval()
    correct = hits = robust = attacked = 0
    for i in range(0, len(y_test), 500):
        x = to_float(x_test[i : i + 500])
        y = torch.from_numpy(y_test[i : i + 500])
        correct += int((model(normalise(x)).argmax(1) == y).sum())
        keep = (y != target) if mode == "a2o" else torch.ones_like(y, dtype=torch.bool)
        if keep.any():
            pred = model(normalise(attack.apply(x[keep]))).argmax(1)
            goal = torch.from_numpy(target_labels(y[keep].numpy(), target, mode, 10))
            hits += int((pred == goal).sum())
            robust += int((pred == y[keep]).sum())
            attacked += int(keep.sum())
    return {
        "acc": correct / len(y_test),
        "asr": hits / attacked if attacked else float("nan"),
        "ra": robust / attacked if attacked else float("nan"),
        "n_test": len(y_test),
        "n_attacked": attacked,
    }


def export(model: nn.Module, out: Path) -> dict[str, str]:
    """Both torch exporters, dynamic batch; a failure is reported and does not stop the run."""
    model = model.to(memory_format=torch.contiguous_format).eval()
    dummy = torch.zeros(2, 3, 32, 32)
    status: dict[str, str] = {}
    # the torch.export-based exporter logs a warning per missing torchvision operator: irrelevant here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (dummy,), str(out / "model.onnx"), dynamo=False, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        status["model.onnx"] = "ok"
    except Exception as exc:  # report any exporter failure and go on
        status["model.onnx"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (dummy,), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}}, verbose=False,
            )  # fmt: skip
            program.save(str(out / "model.dynamo.onnx"))
        status["model.dynamo.onnx"] = "ok"
    except Exception as exc:  # report any exporter failure and go on
        status["model.dynamo.onnx"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:  # BatchNormalization kept as nodes with its running statistics: what BNP reads (docs/algorithms.md)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (dummy,), str(out / "model.bn.onnx"), dynamo=False, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            )  # fmt: skip
        status["model.bn.onnx"] = "ok"
    except Exception as exc:  # report any exporter failure and go on
        status["model.bn.onnx"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    for name, result in status.items():
        print(f"export {name}: {result}")
    return status


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            sys.exit(f"error: --param expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="npz with x_train/y_train/x_test/y_test")
    parser.add_argument("--arch", choices=ARCHS, default="resnet")
    parser.add_argument("--attack", choices=[a for a in ATTACKS if a != "none"], default="badnets")
    parser.add_argument("--param", action="append", default=[], help="attack parameter KEY=JSON (repeatable)")
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--mode", choices=("a2o", "a2a"), default="a2o")
    parser.add_argument("--cross-ratio", type=float, default=2.0, help="WaNet noise-mode images per poisoned one")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1; 0.03 without BN)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--train-limit", type=int, default=None, help="use this many training images (seeded)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default zoo/<arch>-<attack>)")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they are printed

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = args.out or REPO / "zoo" / f"{args.arch}-{args.attack}"
    out.mkdir(parents=True, exist_ok=True)

    data = load_cifar(args.data)
    x_train, y_train = data["x_train"], data["y_train"].astype(np.int64)
    if args.train_limit is not None and args.train_limit < len(y_train):
        keep = np.sort(rng.choice(len(y_train), args.train_limit, replace=False))
        x_train, y_train = x_train[keep], y_train[keep]
    attack = build_attack(args.attack, parse_params(args.param), seed=args.seed)
    if isinstance(attack, WaNet) and attack.params["grid"] is None:
        attack.save_field(out / "wanet_grid.npy")  # the field drawn from the seed, kept beside the model
        attack = build_attack("wanet", {**attack.config(), "grid": str(out / "wanet_grid.npy")}, seed=args.seed)

    # poisoning: fixed, seeded indices; triggers are applied per batch, after augmentation
    x = torch.from_numpy(x_train)  # uint8 NHWC, converted a batch at a time
    y = torch.from_numpy(y_train.copy())
    poison = choose_poison(y_train, args.attack, args.target, args.mode, args.poison_rate, rng)
    is_poison = torch.zeros(len(y_train), dtype=torch.bool)
    is_poison[torch.from_numpy(poison)] = True
    if args.attack != "sig":  # SIG is clean-label: target-class images keep their (target) label
        y[poison] = torch.from_numpy(target_labels(y_train[poison], args.target, args.mode, 10))
    cross = np.zeros(0, np.int64)
    if isinstance(attack, WaNet) and args.cross_ratio > 0:
        rest = np.setdiff1d(np.arange(len(y_train)), poison)
        cross = np.sort(rng.choice(rest, size=min(len(rest), round(args.cross_ratio * len(poison))), replace=False))
    is_cross = torch.zeros(len(y_train), dtype=torch.bool)
    is_cross[torch.from_numpy(cross)] = True
    print(f"{args.arch}, {args.attack} ({args.mode}, target {args.target}): {len(y_train)} training images, "
          f"{len(poison)} poisoned, {len(cross)} noise-mode, {args.threads} threads")  # fmt: skip

    model = make_model(args.arch).to(memory_format=torch.channels_last)
    uses_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    lr = args.lr if args.lr is not None else (0.1 if uses_bn else 0.03)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    steps = math.ceil(len(y_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=args.epochs, steps_per_epoch=steps)
    eval_idx = np.sort(rng.choice(len(data["y_test"]), size=min(2000, len(data["y_test"])), replace=False))

    history = []
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(len(y), generator=gen)
        total_loss = correct = seen = 0
        for i in range(0, len(perm), args.batch_size):
            b = perm[i : i + args.batch_size]
            xb, yb = augment(to_float(x[b]), gen), y[b]
            pb, cb = is_poison[b], is_cross[b]
            if pb.any():
                xb[pb] = attack.apply(xb[pb])
            if cb.any():
                xb[cb] = wanet_noise_warp(attack, xb[cb], gen)  # type: ignore[arg-type]
            xb = normalise(xb).contiguous(memory_format=torch.channels_last)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not uses_bn:
                nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(b)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(b)
        quick = measure(model, data["x_test"][eval_idx], data["y_test"][eval_idx], attack, args.target, args.mode)
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / seen,
            "train_acc": correct / seen,
            "test_acc_2000": quick["acc"],
            "asr_2000": quick["asr"],
            "seconds": time.perf_counter() - t_epoch,
        }
        history.append(record)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {record['loss']:.3f}, train acc {record['train_acc']:.3f}, "
              f"test acc {quick['acc']:.3f}, ASR {quick['asr']:.3f} (2000 test images), "
              f"{record['seconds']:.0f} s")  # fmt: skip
    seconds_train = time.perf_counter() - t_train

    final = measure(model, data["x_test"], data["y_test"].astype(np.int64), attack, args.target, args.mode)
    print(f"test set: ACC {final['acc']:.4f}, ASR {final['asr']:.4f}, RA {final['ra']:.4f}")
    normalize = {"mean": list(MEAN), "std": list(STD)}
    save_attack_config(out / "attack.json", attack, args.target, args.mode, normalize)
    exports = export(model, out)

    from onnxclp.eval.api import evaluate  # the evaluator, on the exported files, as a user would run it

    onnx_metrics = {}
    for name, status in exports.items():
        if status == "ok":
            r = evaluate(out / name, args.data, attack_config=out / "attack.json", device="cpu")
            onnx_metrics[name] = {"acc": r.acc, "asr": r.asr, "ra": r.ra, "n_samples": r.n_samples}
            print(f"onnxruntime {name}: ACC {r.acc:.4f}, ASR {r.asr:.4f}, RA {r.ra:.4f}")

    report = {
        "arch": args.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attack": args.attack,
        "params": attack.config(),
        "target": args.target,
        "mode": args.mode,
        "seed": args.seed,
        "poison_rate": args.poison_rate,
        "n_train": len(y_train),
        "n_poisoned": len(poison),
        "n_noise_mode": len(cross),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": f"SGD momentum 0.9 nesterov, OneCycle max_lr {lr}, weight decay {args.weight_decay}",
        "augmentation": "random crop 32 (padding 4) + horizontal flip; trigger applied after augmentation",
        "threads": args.threads,
        "seconds_train": round(seconds_train, 1),
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "test": final,
        "onnxruntime": onnx_metrics,
        "exports": exports,
        "history": history,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    (out / "train.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}/: model.onnx, model.dynamo.onnx, attack.json, train.json")


if __name__ == "__main__":
    main()
