"""Throughput of ``onnxclp evaluate`` against a bare onnxruntime loop over the same images, on several models.

For each model (CIFAR-style networks with random weights, bench/_torch_models.py's ResNets and a VGG defined
here, exported with torch's TorchScript exporter: ResNet-20, a narrow and fast ResNet, a wider ResNet, a small VGG, and ResNet-20 exported with a fixed
batch dimension so that evaluate's cutting and zero-padding is measured too), on the same images (CIFAR-10's
test set when ``../shared/data/cifar10.npz`` is present, else synthetic images of the same shape) and the same
attack (BadNets, normalised as in training):

1. ``evaluate()`` end to end: loading, triggering, normalising and batching included (its own timer covers the
   batch loop; the whole call is reported too);
2. a bare ``session.run`` loop over preloaded, pre-triggered, pre-normalised float32 arrays (zero-padded to the
   fixed batch where the model has one), same batch size, same images (clean + triggered), onnxruntime's default
   session options; and the same loop with evaluate's session options (intra-op threads do not spin);
3. with ``--torch-eager``, torch eager inference of the same ``nn.Module`` over the same arrays.

Each is run ``--repeat`` times, interleaved, and the best run counts (the machine may be shared). The ratios are
printed: wall-clock throughput, and process CPU time per image (every thread; less sensitive to other jobs on a
shared machine); nothing fails on a timing. Run from the repository root: ``python bench/evaluate_speed.py``.
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
from _torch_models import cifar_resnet
from torch import nn

from onnxclp.eval.api import evaluate
from onnxclp.eval.attacks import attacked_mask, build_attack

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10.npz"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class VGG(nn.Module):
    """A small VGG: conv-BN-ReLU blocks 32-M-64-M-128-M, global average pool, one FC layer."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in (32, "M", 64, "M", 128, 128, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, 1, 1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


# name -> (module factory, fixed batch dimension in the exported file)
MODELS = {
    "resnet20": (lambda: cifar_resnet(16, 3), False),
    "resnet8-narrow": (lambda: cifar_resnet(8, 1), False),
    "resnet14-wide": (lambda: cifar_resnet(32, 2), False),
    "vgg-small": (lambda: VGG(), False),
    "resnet20-fixed-batch": (lambda: cifar_resnet(16, 3), True),
}


def load_images(limit: int) -> tuple[np.ndarray, np.ndarray, str]:
    if CIFAR.is_file():
        with np.load(CIFAR) as d:
            x, y = d["x_test"][:limit], d["y_test"][:limit]
        return x, y, "CIFAR-10 test set"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (limit, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, limit), "synthetic"


def preloaded_batches(x: np.ndarray, y: np.ndarray, batch: int, fixed: bool) -> tuple[list[np.ndarray], int]:
    """Clean and triggered batches, normalised float32 NCHW (zero-padded to ``batch`` for a fixed-batch
    model), prepared before any timer starts; with the number of real images."""
    attack = build_attack("badnets")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out, n = [], 0
    for i in range(0, len(x), batch):
        clean = torch.from_numpy(x[i : i + batch]).permute(0, 3, 1, 2).float() / 255
        keep = torch.from_numpy(attacked_mask(y[i : i + batch], 0, "a2o"))
        trig = attack.apply(clean[keep])
        for t in (clean, trig):
            arr = ((t - mean) / std).numpy()
            n += len(arr)
            if fixed and len(arr) < batch:
                arr = np.concatenate([arr, np.zeros((batch - len(arr), *arr.shape[1:]), arr.dtype)])
            out.append(np.ascontiguousarray(arr))
    return out, n


def time_ort(session: ort.InferenceSession, batches: list[np.ndarray]) -> tuple[float, float]:
    """Wall seconds and process CPU seconds (all threads) of a bare loop."""
    name = session.get_inputs()[0].name
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        session.run(None, {name: b})[0].argmax(1)
    return time.perf_counter() - t0, time.process_time() - c0


def time_torch(model: nn.Module, batches: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(torch.from_numpy(b)).argmax(1)
    return time.perf_counter() - t0


def bench_model(name: str, args: argparse.Namespace, x: np.ndarray, y: np.ndarray, tmp: Path, threads: int) -> dict:
    factory, fixed = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    onnx_path, data_path = tmp / f"{name}.onnx", tmp / "test.npz"
    shape = (args.batch_size if fixed else 1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, torch.zeros(shape), str(onnx_path), input_names=["x"], output_names=["y"],
            dynamic_axes=None if fixed else {"x": {0: "n"}, "y": {0: "n"}}, dynamo=False,
        )  # fmt: skip
    if not data_path.exists():
        np.savez(data_path, x_test=x, y_test=y)
    batches, images = preloaded_batches(x, y, args.batch_size, fixed)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    # the same loop with evaluate's session options (onnxruntime's intra-op threads do not spin between runs)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    same = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    time_ort(session, batches[:2])  # warm-up
    time_ort(same, batches[:2])
    if args.torch_eager:
        time_torch(model, batches[:2])

    def run_evaluate(prefetch: int) -> tuple[float, float, int, float]:
        c0 = time.process_time()
        r = evaluate(
            onnx_path, data_path, "badnets", mean=MEAN, std=STD, batch_size=args.batch_size, device="cpu",
            threads=threads, prefetch=prefetch,
        )  # fmt: skip
        return r.seconds, r.total_seconds, r.images, time.process_time() - c0

    keys = ["evaluate", "evaluate_total", "bare", "bare_no_spin"] + (["no_prefetch"] if args.no_prefetch else [])
    keys += ["torch"] if args.torch_eager else []
    runs: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {"bare": [], "evaluate_total": []}
    n_eval = 0
    for _ in range(args.repeat):
        wall, cpu_s = time_ort(session, batches)
        runs["bare"].append(wall)
        cpu["bare"].append(cpu_s)
        runs["bare_no_spin"].append(time_ort(same, batches)[0])
        loop, total, n_eval, cpu_s = run_evaluate(2)
        runs["evaluate"].append(loop)
        runs["evaluate_total"].append(total)
        cpu["evaluate_total"].append(cpu_s)
        if args.no_prefetch:
            runs["no_prefetch"].append(run_evaluate(0)[0])
        if args.torch_eager:
            runs["torch"].append(time_torch(model, batches))
    assert n_eval == images, (n_eval, images)
    rate = {k: images / min(v) for k, v in runs.items()}
    out = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "fixed_batch": fixed,
        "images": images,
        "images_per_second": {k: round(v, 1) for k, v in rate.items()},
        "evaluate_vs_bare": round(rate["evaluate"] / rate["bare"], 3),
        "whole_call_vs_bare": round(rate["evaluate_total"] / rate["bare"], 3),
        "evaluate_vs_bare_same_options": round(rate["evaluate"] / rate["bare_no_spin"], 3),
        # process CPU seconds (every thread) per image, bare over evaluate's whole call: the overhead in work,
        # less sensitive than wall time to other jobs on a shared machine
        "cpu_bare_over_evaluate": round(min(cpu["bare"]) / min(cpu["evaluate_total"]), 3),
    }
    if args.no_prefetch:
        out["no_prefetch_vs_bare"] = round(rate["no_prefetch"] / rate["bare"], 3)
    if args.torch_eager:
        out["onnxruntime_vs_torch_eager"] = round(rate["bare"] / rate["torch"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5000, help="test images (default 5000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="threads for onnxruntime and torch (0: all cores)")
    parser.add_argument("--no-prefetch", action="store_true", help="also time evaluate without the prefetch thread")
    parser.add_argument("--torch-eager", action="store_true", help="also time torch eager inference")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    x, y, source = load_images(args.limit)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"{source}, {len(x)} test images, batch {args.batch_size}, {threads} threads, best of {args.repeat}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = bench_model(name, args, x, y, Path(tmp), threads)
            results.append(r)
            ips = r["images_per_second"]
            extra = "".join(
                f"  {k} {r[k]:.3f}" for k in ("no_prefetch_vs_bare", "onnxruntime_vs_torch_eager") if k in r
            )
            print(
                f"  {name:<22} evaluate {ips['evaluate']:7.0f}/s  bare session.run {ips['bare']:7.0f}/s  "
                f"ratio {r['evaluate_vs_bare']:.3f}  (whole call {r['whole_call_vs_bare']:.3f}; CPU time "
                f"{r['cpu_bare_over_evaluate']:.3f}; vs bare with evaluate's session options "
                f"{r['evaluate_vs_bare_same_options']:.3f}){extra}",
                flush=True,
            )
    report = {
        "data": source,
        "test_images": len(x),
        "batch_size": args.batch_size,
        "threads": threads,
        "repeats": args.repeat,
        "load_average_at_start": load,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "models": results,
    }
    print(f"  lowest evaluate / bare session.run: {min(r['evaluate_vs_bare'] for r in results):.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
