"""Speed and memory of ``onnxclp sanitize``, measured as ratios in one run.

For a ResNet-18-sized (CIFAR variant, ~11 M parameters) and a ResNet-50-sized model with random weights:
1. whole-process time of ``onnxclp sanitize`` against a ``python -c`` doing only onnx.load + onnx.save of
   the same model (target <= 1.5x);
2. time of onnxclp's scoring step against the reference algorithm in torch, one ``torch.linalg.svd`` per
   channel as the public CLP code does (target >= 20x faster);
3. peak RSS of the sanitize process against that of the load+save process (target <= 1.5x).

Run: ``python bench/sanitize_speed.py [--repeat 5]``. Prints a Markdown table (copied into README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from _models import parameter_count, resnet18_cifar, resnet50

# A small launcher measures each child: a child's peak RSS counts the pages of the process that forked it,
# so the benchmark process (with torch loaded) must not fork the measured command itself.
_LAUNCHER = (
    "import os, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n"
)


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Wall time (s) and peak RSS (MiB) of one child process."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True, check=True)
    elapsed, rss_kb, code = out.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{cmd} failed: {out.stderr}")
    return float(elapsed), int(rss_kb) // 1024


def interleaved(a: list[str], b: list[str], repeat: int) -> tuple[tuple[float, int], tuple[float, int]]:
    """Median time and peak RSS of two commands, run alternately so that load on the machine hits both."""
    ra, rb = [], []
    for _ in range(repeat):
        ra.append(run_measured(a))
        rb.append(run_measured(b))
    return (
        (statistics.median(t for t, _ in ra), max(m for _, m in ra)),
        (statistics.median(t for t, _ in rb), max(m for _, m in rb)),
    )


def score_onnxclp(path: Path) -> float:
    from onnxclp.graph import GraphIndex
    from onnxclp.io import load_model
    from onnxclp.layers import find_layers
    from onnxclp.passes.score import score_layers

    model, store = load_model(path)
    index = GraphIndex(model.graph)
    layers = find_layers(index, store).layers
    start = time.perf_counter()
    score_layers(model, index, layers, store, "spectral")
    return time.perf_counter() - start


def score_torch_reference(path: Path) -> float:
    import torch

    model = onnx.load(str(path))
    weights = [
        torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in model.graph.initializer if len(t.dims) == 4
    ]
    start = time.perf_counter()
    for w in weights:
        torch.stack([torch.linalg.svd(w[k].reshape(w.shape[1], -1))[1].max() for k in range(w.shape[0])])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("ResNet-18 (CIFAR)", resnet18_cifar), ("ResNet-50", resnet50)):
            m = build()
            src = Path(tmp) / f"{build.__name__}.onnx"
            onnx.save(m, str(src))
            params, size_mb = parameter_count(m), src.stat().st_size / 2**20
            del m
            out = Path(tmp) / "out.onnx"
            base = [sys.executable, "-c", f"import onnx; onnx.save(onnx.load({str(src)!r}), {str(out)!r})"]
            ours = [sys.executable, "-m", "onnxclp.cli", "sanitize", str(src), str(out), "-q"]
            (t_base, m_base), (t_ours, m_ours) = interleaved(base, ours, args.repeat)
            t_score = min(score_onnxclp(src) for _ in range(args.repeat))
            t_ref = min(score_torch_reference(src) for _ in range(max(1, args.repeat // 2)))
            rows.append((name, params, size_mb, t_base, t_ours, m_base, m_ours, t_score, t_ref))
            print(f"{name}: done", file=sys.stderr)
    print(
        f"\nMeasured on {os.cpu_count()} CPU cores, numpy {np.__version__}, onnx {onnx.__version__}, torch {torch.__version__}\n"
    )
    print(
        "| model | params | file | load+save | sanitize | ratio | RSS load+save | RSS sanitize | ratio | score (onnxclp) | score (torch SVD/channel) | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, params, size_mb, t_base, t_ours, m_base, m_ours, t_score, t_ref in rows:
        print(
            f"| {name} | {params / 1e6:.1f} M | {size_mb:.0f} MiB | {t_base:.2f} s | {t_ours:.2f} s | {t_ours / t_base:.2f}x "
            f"| {m_base} MiB | {m_ours} MiB | {m_ours / m_base:.2f}x | {t_score * 1000:.0f} ms | {t_ref * 1000:.0f} ms "
            f"| {t_ref / t_score:.0f}x |"
        )


if __name__ == "__main__":
    main()
