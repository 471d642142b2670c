"""Throughput of ``onnxclp evaluate`` against a bare onnxruntime loop and against torch eager inference.

Three measurements of the same model (a CIFAR-style ResNet defined here, exported with torch's TorchScript
exporter) on the same images (CIFAR-10's test set when ``../shared/data/cifar10.npz`` is present, else
synthetic images of the same shape), the same attack (BadNets, normalised as in training):

1. ``evaluate()`` end to end: loading, triggering, normalising and batching included (its own timer covers the
   batch loop; the whole call is reported too);
2. a bare ``session.run`` loop over preloaded, pre-triggered, pre-normalised float32 arrays, same batch size,
   same images (clean + triggered);
3. torch eager inference of the same ``nn.Module`` on the CPU over the same arrays, same thread count.

Each is run ``--repeat`` times, interleaved, and the best run counts (the machine may be shared). The ratios are
printed; nothing fails on a timing. Run from the repository root: ``python bench/evaluate_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from onnxclp.eval.api import evaluate
from onnxclp.eval.attacks import attacked_mask, build_attack

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10.npz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class Block(nn.Module):
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
    """CIFAR ResNet with ``blocks`` basic blocks per stage and widths w, 2w, 4w (ResNet-20: blocks 3, w 16)."""

    def __init__(self, width: int = 16, blocks: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))


def load_images(limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    if CIFAR.is_file():
        with np.load(CIFAR) as d:
            x, y = d["x_test"][:limit], d["y_test"][:limit]
        return x, y, "CIFAR-10 test set"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (limit, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, limit), "synthetic"


def preloaded_batches(x: np.ndarray, y: np.ndarray, batch: int) -> list[np.ndarray]:
    """Clean and triggered batches, normalised float32 NCHW, prepared before any timer starts."""
    attack = build_attack("badnets")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(x), batch):
        clean = torch.from_numpy(x[i : i + batch]).permute(0, 3, 1, 2).float() / 255
        keep = torch.from_numpy(attacked_mask(y[i : i + batch], 0, "a2o"))
        trig = attack.apply(clean[keep])
        out.append(((clean - mean) / std).numpy())
        out.append(((trig - mean) / std).numpy())
    return out


def time_ort(session: ort.InferenceSession, batches: list[np.ndarray]) -> float:
    name = session.get_inputs()[0].name
    t0 = time.perf_counter()
    for b in batches:
        session.run(None, {name: b})[0].argmax(1)
    return time.perf_counter() - t0


def time_torch(model: nn.Module, batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(torch.from_numpy(b)).argmax(1)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10000, help="test images (default: all 10000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=16, help="ResNet width (16: ResNet-20)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="threads for onnxruntime and torch (0: all cores)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ResNet(args.width, args.blocks).eval()
    x, y, source = load_images(args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, data_path = Path(tmp) / "resnet.onnx", Path(tmp) / "test.npz"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, torch.zeros(1, 3, 32, 32), str(onnx_path), input_names=["x"], output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
            )  # fmt: skip
        np.savez(data_path, x_test=x, y_test=y)
        batches = preloaded_batches(x, y, args.batch_size)
        images = sum(len(b) for b in batches)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        time_ort(session, batches[:2])  # warm-up
        time_torch(model, batches[:2])

        def run_evaluate(prefetch: int) -> tuple[float, float, int]:
            r = evaluate(
                onnx_path, data_path, "badnets", mean=MEAN, std=STD, batch_size=args.batch_size, device="cpu",
                threads=threads, prefetch=prefetch,
            )  # fmt: skip
            return r.seconds, r.total_seconds, r.images

        runs: dict[str, list[float]] = {k: [] for k in ("evaluate", "evaluate_total", "no_prefetch", "bare", "torch")}
        for _ in range(args.repeat):
            loop, total, n_eval = run_evaluate(2)
            runs["evaluate"].append(loop)
            runs["evaluate_total"].append(total)
            runs["no_prefetch"].append(run_evaluate(0)[0])
            runs["bare"].append(time_ort(session, batches))
            runs["torch"].append(time_torch(model, batches))
        assert n_eval == images, (n_eval, images)

    best = {k: min(v) for k, v in runs.items()}
    rate = {k: images / v for k, v in best.items()}
    report = {
        "data": source,
        "model": f"ResNet width {args.width}, {args.blocks} blocks/stage ({sum(p.numel() for p in model.parameters())} parameters)",
        "images": images,
        "batch_size": args.batch_size,
        "threads": threads,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "images_per_second": {k: round(v, 1) for k, v in rate.items()},
        "evaluate_vs_bare_session_run": round(rate["evaluate"] / rate["bare"], 3),
        "evaluate_whole_call_vs_bare": round(rate["evaluate_total"] / rate["bare"], 3),
        "evaluate_without_prefetch_vs_bare": round(rate["no_prefetch"] / rate["bare"], 3),
        "onnxruntime_vs_torch_eager": round(rate["bare"] / rate["torch"], 3),
        "repeats": args.repeat,
    }
    print(
        f"{report['model']}, {source}, {images} images (clean + triggered), batch {args.batch_size}, {threads} threads"
    )
    for key, label in (
        ("evaluate", "evaluate (batch loop)"),
        ("evaluate_total", "evaluate (whole call)"),
        ("no_prefetch", "evaluate, no prefetch"),
        ("bare", "bare session.run"),
        ("torch", "torch eager (CPU)"),
    ):
        print(f"  {label:<24} {rate[key]:9.0f} images/s")
    print(f"  evaluate / bare session.run   {report['evaluate_vs_bare_session_run']:.3f}  (target >= 0.8)")
    print(f"  whole call / bare session.run {report['evaluate_whole_call_vs_bare']:.3f}")
    print(f"  no prefetch / bare            {report['evaluate_without_prefetch_vs_bare']:.3f}")
    print(f"  onnxruntime / torch eager     {report['onnxruntime_vs_torch_eager']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
