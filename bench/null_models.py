"""Train the clean "null" models on which the scan verdict's false-positive rate is calibrated and measured.

Small clean CNNs that vary what a clean model a user brings can vary: architecture (plain CNN with or without
BatchNorm, residual, VGG-style, depthwise-separable, 1x1-convolution classifier), width, depth, seed, input size
(32x32 and 16x16), colour (RGB and grayscale) and task (CIFAR-10 and class subsets of it). Each trains for a few
epochs on a subset of CIFAR-10's training images with one torch thread (``torch.set_num_threads(1)``), so that
several can train beside other work on a small machine; they are not good models (30-75 % test accuracy), but
they are trained clean models of the kinds ``scan`` meets, which is what the null needs.

Every model goes to ``OUT/<name>/model.onnx`` with ``train.json`` (configuration, test accuracy, normalisation,
``poison_rate`` 0, and ``split``: ``calibration`` for the models the verdict rule was chosen and fitted on,
``heldout`` for those on which its false-positive rate is measured, bench/detect_roc.py). The normalisation is
also written into the model's metadata (``onnxclp.normalize``), as a user's export would carry it. Exports: the
TorchScript exporter in eval mode with constant folding (BatchNorm folded into the convolutions) for most, the
dynamo exporter for some (BatchNorm kept as nodes); a failed dynamo export falls back to TorchScript and says so.

Usage: ``python bench/null_models.py [--out zoo-null] [--data ../shared/data/cifar10.npz] [--only NAME ...]
[--jobs 2]``; a model whose folder already has ``model.onnx`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.247, 0.2435, 0.2616]
GRAY_MEAN, GRAY_STD = [0.481], [0.239]


@dataclass(frozen=True)
class Spec:
    name: str
    arch: str  # cnn | cnn-nobn | resnet | vgg | dwsep | conv1x1
    width: int
    depth: int  # stages (cnn/vgg/dwsep/conv1x1) or blocks per stage (resnet)
    classes: tuple[int, ...]  # CIFAR-10 classes of the task, relabelled 0..K-1
    size: int  # 32 or 16
    gray: bool
    seed: int
    split: str  # calibration | heldout
    export: str = "torchscript"  # or dynamo
    epochs: int = 4
    n_train: int = 8000


ALL = tuple(range(10))
SPECS = [
    # calibration: the rule is chosen and fitted on these
    Spec("cnn-w16-d3-c10", "cnn", 16, 3, ALL, 32, False, 1, "calibration"),
    Spec("resnet-w16-b1-c10", "resnet", 16, 1, ALL, 32, False, 2, "calibration"),
    Spec("vgg-w16-d3-c10", "vgg", 16, 3, ALL, 32, False, 3, "calibration", "dynamo"),
    Spec("dwsep-w24-d3-c10", "dwsep", 24, 3, ALL, 32, False, 4, "calibration"),
    Spec("conv1x1-w16-d3-c10", "conv1x1", 16, 3, ALL, 32, False, 5, "calibration"),
    Spec("cnn-w24-d2-sub5", "cnn", 24, 2, (0, 1, 2, 3, 4), 32, False, 6, "calibration"),
    Spec("resnet-w8-b2-gray", "resnet", 8, 2, ALL, 32, True, 7, "calibration", "dynamo"),
    Spec("cnn-w16-d3-r16", "cnn", 16, 3, ALL, 16, False, 8, "calibration"),
    Spec("cnn-nobn-w32-d3-c10", "cnn-nobn", 32, 3, ALL, 32, False, 9, "calibration"),
    Spec("vgg-w8-d2-sub6", "vgg", 8, 2, (2, 3, 4, 5, 6, 7), 32, False, 10, "calibration"),
    Spec("resnet-w16-b1-gray16", "resnet", 16, 1, ALL, 16, True, 11, "calibration"),
    Spec("dwsep-w16-d2-sub4", "dwsep", 16, 2, (1, 3, 5, 7), 32, False, 12, "calibration"),
    Spec("cnn-w32-d4-c10", "cnn", 32, 4, ALL, 32, False, 13, "calibration", "dynamo"),
    # held out: the false-positive rate is measured on these only
    Spec("cnn-w16-d3-c10-s2", "cnn", 16, 3, ALL, 32, False, 21, "heldout"),
    Spec("resnet-w12-b2-c10", "resnet", 12, 2, ALL, 32, False, 22, "heldout"),
    Spec("vgg-w24-d3-c10", "vgg", 24, 3, ALL, 32, False, 23, "heldout"),
    Spec("dwsep-w32-d3-c10", "dwsep", 32, 3, ALL, 32, False, 24, "heldout", "dynamo"),
    Spec("conv1x1-w24-d2-sub5", "conv1x1", 24, 2, (5, 6, 7, 8, 9), 32, False, 25, "heldout"),
    Spec("cnn-w12-d3-gray", "cnn", 12, 3, ALL, 32, True, 26, "heldout"),
    Spec("resnet-w16-b1-r16", "resnet", 16, 1, ALL, 16, False, 27, "heldout"),
    Spec("cnn-nobn-w16-d2-sub5", "cnn-nobn", 16, 2, (0, 2, 4, 6, 8), 32, False, 28, "heldout"),
    Spec("vgg-w16-d2-gray16", "vgg", 16, 2, ALL, 16, True, 29, "heldout"),
    Spec("resnet-w8-b1-sub4", "resnet", 8, 1, (0, 1, 8, 9), 32, False, 30, "heldout", "dynamo"),
    Spec("cnn-w24-d4-c10", "cnn", 24, 4, ALL, 32, False, 31, "heldout"),
    Spec("dwsep-w16-d3-r16-sub6", "dwsep", 16, 3, (0, 1, 2, 3, 4, 5), 16, False, 32, "heldout"),
    Spec("conv1x1-w16-d3-gray", "conv1x1", 16, 3, ALL, 32, True, 33, "heldout", "dynamo"),
]


def build(spec: Spec):  # -> torch.nn.Module
    import torch
    from torch import nn

    cin, k = (1 if spec.gray else 3), len(spec.classes)

    def conv_bn(a: int, b: int, stride: int = 1, bn: bool = True, groups: int = 1) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(a, b, 3, stride, 1, bias=not bn, groups=groups)]
        return layers + ([nn.BatchNorm2d(b)] if bn else []) + [nn.ReLU()]

    class Block(nn.Module):
        def __init__(self, a: int, b: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(*conv_bn(a, b, stride), nn.Conv2d(b, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b))
            self.short = (
                nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))
                if stride != 1 or a != b
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.short(x))

    w = spec.width
    if spec.arch == "resnet":
        layers: list[nn.Module] = conv_bn(cin, w)
        a = w
        for stage in range(3):
            b = w * 2**stage
            for i in range(spec.depth):
                layers.append(Block(a, b, 2 if (stage > 0 and i == 0) else 1))
                a = b
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(a, k))
    layers = []
    a = cin
    for stage in range(spec.depth):
        b = w * 2 ** min(stage, 2)
        if spec.arch in ("cnn", "cnn-nobn", "conv1x1"):
            layers += conv_bn(a, b, bn=spec.arch != "cnn-nobn")
        elif spec.arch == "vgg":  # two convolutions per stage, no BatchNorm
            layers += conv_bn(a, b, bn=False) + conv_bn(b, b, bn=False)
        elif spec.arch == "dwsep":
            separable = [*conv_bn(a, a, groups=a), nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
            layers += conv_bn(a, b) if stage == 0 else separable
        layers.append(nn.MaxPool2d(2))
        a = b
    if spec.arch == "conv1x1":  # the classifier is a 1x1 convolution, then global pooling
        return nn.Sequential(*layers, nn.Conv2d(a, k, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if spec.arch == "vgg":
        head += [nn.Linear(a, 2 * a), nn.ReLU()]
        a = 2 * a
    return nn.Sequential(*layers, *head, nn.Linear(a, k))


def task_data(spec: Spec, data: dict[str, np.ndarray], split: str, n: int | None, seed: int):
    import torch

    x, y = data[f"x_{split}"], data[f"y_{split}"]
    keep = np.isin(y, spec.classes)
    x, y = x[keep], y[keep]
    if n is not None and n < len(y):
        idx = np.random.default_rng(seed).choice(len(y), n, replace=False)
        x, y = x[idx], y[idx]
    relabel = {c: i for i, c in enumerate(spec.classes)}
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    if spec.gray:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if spec.size != t.shape[-1]:
        t = torch.nn.functional.interpolate(t, size=(spec.size, spec.size), mode="bilinear", antialias=True)
    mean, std = (GRAY_MEAN, GRAY_STD) if spec.gray else (CIFAR_MEAN, CIFAR_STD)
    t = (t - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    return t, torch.tensor([relabel[int(c)] for c in y])


def export(model, spec: Spec, path: Path) -> str:
    import onnx
    import torch

    from onnxclp.eval.normalize import set_normalization

    model.eval()
    c = 1 if spec.gray else 3
    dummy = torch.zeros(2, c, spec.size, spec.size)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    how = spec.export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "dynamo":
            try:
                program = torch.onnx.export(
                    model, (dummy,), dynamo=True, input_names=["input"], output_names=["logits"],
                    dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=65536)}}, verbose=False,
                )  # fmt: skip
                program.save(str(path))
            except Exception as exc:  # fall back, and say so in train.json
                how = f"torchscript (dynamo failed: {type(exc).__name__})"
        if how != "dynamo":
            torch.onnx.export(
                model, (dummy,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, do_constant_folding=True,
            )  # fmt: skip
    m = onnx.load(str(path))
    mean, std = (GRAY_MEAN, GRAY_STD) if spec.gray else (CIFAR_MEAN, CIFAR_STD)
    set_normalization(m, mean, std)
    onnx.save(m, str(path))
    return how


def train_one(spec: Spec, out: Path, data_path: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    with np.load(data_path) as d:
        data = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    x, y = task_data(spec, data, "train", spec.n_train, spec.seed)
    xt, yt = task_data(spec, data, "test", 2000, 0)
    model = build(spec)
    steps = spec.epochs * ((len(y) + 63) // 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    gen = torch.Generator().manual_seed(spec.seed)
    t0 = time.perf_counter()
    for _ in range(spec.epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    folder = out / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    how = export(model, spec, folder / "model.onnx")
    mean, std = (GRAY_MEAN, GRAY_STD) if spec.gray else (CIFAR_MEAN, CIFAR_STD)
    info = {
        **asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "exported_with": how,
        "poison_rate": 0.0,
        "normalize": {"mean": mean, "std": std},
        "test_acc": acc,
        "n_test": len(yt),
        "seconds_train": round(seconds, 1),
        "threads": 1,
        "torch": torch.__version__,
    }
    (folder / "train.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{spec.name}: acc {acc:.3f}, {seconds:.0f} s, {info['parameters']} parameters, export {how}", flush=True)
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "zoo-null")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--only", action="append", default=[], help="train only these (repeatable)")
    ap.add_argument("--jobs", type=int, default=1, help="models trained at once (one thread each)")
    args = ap.parse_args(argv)
    todo = [
        s for s in SPECS if (not args.only or s.name in args.only) and not (args.out / s.name / "model.onnx").exists()
    ]
    if args.jobs <= 1:
        for s in todo:
            train_one(s, args.out, args.data)
        return
    import multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for r in pool.starmap(train_one, [(s, args.out, args.data) for s in todo], chunksize=1):
            del r
    sys.stdout.flush()


if __name__ == "__main__":
    main()
