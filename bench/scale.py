"""Scaling measurements for onnxclp.scale.run_tasks: models/s (scan), Ray's per-task overhead, images/s.

On this machine, for 1 in-process worker, a 2-worker local pool and a local Ray instance of 2 CPUs:

1. ``scan`` of N copies of a real export: tests/golden/resnet.torchscript.onnx (a small CIFAR ResNet, 20k
   parameters) and an ImageNet ResNet-18 (11.7M parameters, 45 MB) exported here with torch's TorchScript
   exporter, random weights;
2. no-op tasks: the per-task cost of the machinery itself (pool and Ray);
3. onnxruntime evaluation of CIFAR-size models (ResNet-20 and ResNet-18 for 32×32 inputs) over synthetic images
   handed to the workers as ``shared`` (put once in Ray's object store), one session per model per worker
   (onnxclp.scale.session_cache), batches of 256.

Each measurement is the best of ``--repeat`` runs (2: the first pays the workers' start-up and the
sessions' build). Every backend must give the same outcomes (checked); the numbers are printed as a table and, with ``--json``,
written to a file, with the machine's load average (``os.getloadavg``) before and after each section: the
machine may be shared, so read them with the load. Timings are not asserted. Run from the repository root:
``nice -n 10 python bench/scale.py`` (add ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onnxclp.scale import get_shared, run_tasks, session_cache

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_RESNET = ROOT / "tests" / "golden" / "resnet.torchscript.onnx"
BATCH = 256


# ---------------------------------------------------------------- tasks (module level: picklable by reference)


def scan_task(path: str) -> dict[str, Any]:
    """Scan one model; the totals (small) and the worker's peak RSS in MB."""
    import onnxclp

    cpu = time.process_time()
    totals = onnxclp.scan(path).totals()
    return {"totals": totals, "cpu_s": time.process_time() - cpu, "rss_mb": _peak_rss_mb()}


def noop_task(x: int) -> int:
    """Nothing: measures the machinery."""
    return x


def eval_task(cell: tuple[str, int, int]) -> dict[str, Any]:
    """Classify images [start, stop) of the shared test set with the model at ``path`` (cached session)."""
    path, start, stop = cell
    cpu = time.process_time()
    session = session_cache().session(path)
    name = session.get_inputs()[0].name
    images = get_shared()["images"]
    checksum = 0
    for b in range(start, stop, BATCH):
        logits = session.run(None, {name: images[b : min(b + BATCH, stop)]})[0]
        checksum += int(logits.argmax(1).sum())
    return {"n": stop - start, "checksum": checksum, "cpu_s": time.process_time() - cpu, "rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- models


def _export_models(folder: Path) -> dict[str, Path]:
    """ResNet-18 (ImageNet stem, 224×224), ResNet-20 and ResNet-18 (CIFAR stem, 32×32), random weights."""
    import torch
    from _torch_models import ResNet, randomize_bn

    specs = {
        "resnet18_imagenet": (ResNet([64, 128, 256, 512], 2, 1000, True), 224),
        "resnet20_cifar": (ResNet([16, 32, 64], 3, 10, False), 32),
        "resnet18_cifar": (ResNet([64, 128, 256, 512], 2, 10, False), 32),
    }
    out = {}
    torch.manual_seed(0)
    for name, (net, size) in specs.items():
        net.eval()
        randomize_bn(net)
        path = folder / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net, torch.randn(1, 3, size, size), str(path), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
            )  # fmt: skip
        out[name] = path
    return out


# ---------------------------------------------------------------- measuring


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


REPEAT = 2


def _timed(fn: Callable[..., Any], items: list[Any], **kw: Any) -> tuple[float, list[Any]]:
    """Best of REPEAT runs (the first one pays the workers' start and the sessions' build; a shared machine's
    load only ever slows a run down)."""
    best = float("inf")
    values: list[Any] = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        outcomes = run_tasks(fn, items, retries=0, **kw)
        best = min(best, time.perf_counter() - start)
        bad = [o.error for o in outcomes if not o.ok]
        if bad:
            raise SystemExit(f"task failed: {bad[0]}")
        values = [o.value for o in outcomes]
    return best, values


BACKENDS: dict[str, dict[str, Any]] = {
    "workers=1": {"workers": 1},
    "workers=2": {"workers": 2},
    "ray": {"ray": "local"},
}


def _compare(name: str, results: dict[str, list[Any]], strip: Callable[[Any], Any]) -> None:
    first = next(iter(results.values()))
    for backend, values in results.items():
        if [strip(v) for v in values] != [strip(v) for v in first]:
            raise SystemExit(f"{name}: {backend} differs from the first backend")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies-small", type=int, default=64, help="copies of the golden CIFAR ResNet to scan")
    ap.add_argument("--copies-large", type=int, default=8, help="copies of the ImageNet ResNet-18 to scan")
    ap.add_argument("--noop", type=int, default=1000, help="no-op tasks for the overhead measurement")
    ap.add_argument("--images", type=int, default=10000, help="synthetic 32×32 images for the ResNet-20")
    ap.add_argument("--images-r18", type=int, default=1000, help="synthetic 32×32 images for the CIFAR ResNet-18")
    ap.add_argument(
        "--chunk", type=int, default=1000, help="images per evaluation task (at most a quarter of the images)"
    )
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement, the best counts")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    args = ap.parse_args()
    global REPEAT
    REPEAT = max(1, args.repeat)
    if args.quick:
        args.copies_small, args.copies_large, args.noop, args.images, args.images_r18 = 8, 2, 100, 2000, 500

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")  # warm-up below
    try:
        ray_init = _ray_init_time()
        result: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "repeat": REPEAT,
            "load_start": _load(),
            "ray_init_s": ray_init,
        }
        with tempfile.TemporaryDirectory(prefix="onnxclp-scale-bench-") as tmp:
            folder = Path(tmp)
            models = _export_models(folder)
            result["scan"] = _bench_scan(folder, models, args)
            result["noop"] = _bench_noop(args)
            result["eval"] = _bench_eval(models, args)
        result["load_end"] = _load()
    finally:
        ray.shutdown()
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _ray_init_time() -> float:
    """A second, separate local Ray start, timed (what ``--ray local`` pays once per command)."""
    import subprocess
    import sys

    code = "import time,ray;t=time.perf_counter();ray.init(address='local',num_cpus=2,include_dashboard=False,log_to_driver=False,logging_level='ERROR');print(time.perf_counter()-t);ray.shutdown()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return round(float(out.strip().splitlines()[-1]), 2)


def _bench_scan(folder: Path, models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, src, copies in (
        ("golden_cifar_resnet", GOLDEN_RESNET, args.copies_small),
        ("resnet18_imagenet", models["resnet18_imagenet"], args.copies_large),
    ):
        paths = []
        for k in range(copies):
            dst = folder / f"{label}-{k:04d}.onnx"
            shutil.copyfile(src, dst)
            paths.append(str(dst))
        row: dict[str, Any] = {"copies": copies, "bytes": src.stat().st_size, "load": _load()}
        values = {}
        for backend, kw in BACKENDS.items():
            elapsed, values[backend] = _timed(scan_task, paths, **kw)
            row[backend] = {
                "s": round(elapsed, 3),
                "models_per_s": round(copies / elapsed, 2),
                "s_per_model": round(elapsed / copies, 4),
                "peak_rss_mb": round(max(v["rss_mb"] for v in values[backend])),
                "cpu_s_per_model": round(sum(v["cpu_s"] for v in values[backend]) / copies, 4),
            }
        _compare(f"scan {label}", values, lambda v: v["totals"])
        out[label] = row
    return out


def _bench_noop(args: argparse.Namespace) -> dict[str, Any]:
    items = list(range(args.noop))
    row: dict[str, Any] = {"tasks": args.noop, "load": _load()}
    for backend, kw in BACKENDS.items():
        elapsed, values = _timed(noop_task, items, **kw)
        assert values == items
        row[backend] = {"s": round(elapsed, 3), "ms_per_task": round(1000 * elapsed / args.noop, 3)}
    return row


def _bench_eval(models: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    mean = np.array([0.4914, 0.4822, 0.4465], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], np.float32).reshape(1, 3, 1, 1)
    out: dict[str, Any] = {}
    for name, n in (("resnet20_cifar", args.images), ("resnet18_cifar", args.images_r18)):
        rng = np.random.default_rng(0)
        images = ((rng.integers(0, 256, (n, 3, 32, 32)).astype(np.float32) / 255 - mean) / std).astype(np.float32)
        chunk = max(BATCH, min(args.chunk, n // 4))
        cells = [(str(models[name]), s, min(s + chunk, n)) for s in range(0, n, chunk)]
        row: dict[str, Any] = {"images": n, "tasks": len(cells), "load": _load()}
        values = {}
        for backend, kw in BACKENDS.items():
            elapsed, values[backend] = _timed(eval_task, cells, shared={"images": images}, **kw)
            row[backend] = {
                "s": round(elapsed, 3),
                "images_per_s": round(n / elapsed),
                "peak_rss_mb": round(max(v["rss_mb"] for v in values[backend])),
                "cpu_ms_per_image": round(1000 * sum(v["cpu_s"] for v in values[backend]) / n, 3),
            }
        _compare(f"eval {name}", values, lambda v: v["checksum"])
        out[name] = row
    return out


def _print(r: dict[str, Any]) -> None:
    print(f"cpus {r['cpus']}, load average {r['load_start']} -> {r['load_end']}, local ray.init {r['ray_init_s']} s")
    print("\nscan (models/s; wall s/model; CPU s/model inside the task; worker peak RSS MB)")
    for label, row in r["scan"].items():
        cells = "  ".join(
            f"{b}: {row[b]['models_per_s']}/s {row[b]['s_per_model']} s cpu {row[b]['cpu_s_per_model']} s "
            f"{row[b]['peak_rss_mb']} MB"
            for b in BACKENDS
        )
        print(f"  {label} ×{row['copies']} (load {row['load']}): {cells}")
    row = r["noop"]
    print(f"\nno-op tasks ×{row['tasks']} (ms/task): " + "  ".join(f"{b}: {row[b]['ms_per_task']}" for b in BACKENDS))
    print("\nevaluation (images/s; CPU ms/image inside the task, all threads; worker peak RSS MB)")
    for name, row in r["eval"].items():
        cells = "  ".join(
            f"{b}: {row[b]['images_per_s']}/s cpu {row[b]['cpu_ms_per_image']} ms {row[b]['peak_rss_mb']} MB"
            for b in BACKENDS
        )
        print(f"  {name} {row['images']} images in {row['tasks']} tasks (load {row['load']}): {cells}")


if __name__ == "__main__":
    main()
