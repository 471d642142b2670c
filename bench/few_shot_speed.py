"""Wall and CPU time of the few-shot methods (ANP, BNP) beside CLP on a CIFAR ResNet-18, in one run.

Issue 12's target: each few-shot method under 120 s on a ResNet-18-size CIFAR model on the 2-core machine.
Builds the CIFAR ResNet-18 of bench/defences_speed.py (width 64: full, 32: half), random weights (the time does
not depend on training), exported with BatchNorm kept (``TrainingMode.PRESERVE``, no constant folding: BNP
needs the running statistics; ANP then masks the BN channels), and times ``onnxclp.api.sanitize_file`` with
each method's defaults on 500 clean images (``--data``: an .npz the loader reads, default 500 random images).
CPU time is printed beside wall time: on a shared machine, CPU time / threads estimates an idle machine's wall.

    nice -n 10 python bench/few_shot_speed.py [--width 32 64] [--threads 2] [--data clean.npz] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def export(width: int, path: Path) -> None:
    import torch
    from defences_speed import resnet18

    torch.manual_seed(0)
    net = resnet18(width)
    with torch.no_grad():  # random BN statistics: equal constants would be merged into one initializer
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, nargs="+", default=[32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--methods", nargs="+", default=["clp", "bnp", "anp"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    from onnxclp.api import sanitize_file

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = args.data
        if data is None:
            rng = np.random.default_rng(0)
            data = folder / "clean.npz"
            np.savez(
                data, x_test=rng.integers(0, 256, (500, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 500)
            )
        for width in args.width:
            src = folder / f"resnet18-w{width}.onnx"
            export(width, src)
            for method in args.methods:
                ctx = {"clean_data": data, "clean_n": 500, "mean": MEAN, "std": STD}
                t0, c0 = time.perf_counter(), time.process_time()
                rep = sanitize_file(
                    src, folder / f"out-{method}.onnx", method, context=ctx if method != "clp" else None
                )
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                pruned = rep.totals()["pruned_channels"]
                row = {"width": width, "method": method, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                       "cpu_per_thread_s": round(cpu / args.threads, 1), "pruned": pruned}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
