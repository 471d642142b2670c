"""Wall time of the data-free cores (MM-BD, OTBR's unlearning) on a CIFAR ResNet-18, through the torch bridge.

Builds a CIFAR ResNet-18 (BasicBlock x [2, 2, 2, 2], widths w, 2w, 4w, 8w; w = 64 is the full network,
32 the half-width one of issue 12), exports it with the TorchScript exporter, bridges it and times
``mmbd`` and ``otbr_channel_scores`` with their defaults (scored layers: every Conv weight) on ``--threads``
threads. Random weights: the time does not depend on training. Target (issue 12): each under 60 s on 2 cores.
CPU time is printed beside wall time: on a machine shared with other jobs, CPU time / threads estimates the
wall time the same run takes on an idle machine (a lower bound: it assumes perfect use of every thread).

    python bench/defences_speed.py [--width 64 32] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path


def resnet18(width: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.sc = nn.Sequential()
            if stride != 1 or cin != cout:
                self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.sc(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            layers, cin = [], width
            for i, mult in enumerate((1, 2, 4, 8)):
                for j in range(2):
                    layers.append(Block(cin, width * mult, 2 if i > 0 and j == 0 else 1))
                    cin = width * mult
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, 10)

        def forward(self, x):
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))

    return Net().eval()


def measure(width: int, folder: Path) -> dict:
    import torch

    from onnxclp.bridge import load
    from onnxclp.defences import SyntheticInput, mmbd, otbr_channel_scores

    torch.manual_seed(0)
    path = folder / f"resnet18-w{width}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet18(width), (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    module = load(path)
    convs = [n for n in module.float_initializer_names if module.param_for(n).dim() == 4]
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    t0, c0 = time.perf_counter(), time.process_time()
    res = mmbd(module, SyntheticInput((3, 32, 32), mean=mean, std=std))
    t_mmbd, c_mmbd = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    nwc = otbr_channel_scores(module, convs, SyntheticInput((3, 32, 32), mean=mean, std=std))
    t_otbr, c_otbr = time.perf_counter() - t0, time.process_time() - c0
    assert len(nwc.scores) == len(convs)
    return {
        "width": width,
        "params": sum(p.numel() for p in module.parameters()),
        "mmbd_s": t_mmbd,
        "mmbd_cpu_s": c_mmbd,
        "mmbd_steps_run": res.steps_run,
        "otbr_unlearn_s": t_otbr,
        "otbr_unlearn_cpu_s": c_otbr,
        "otbr_layers": len(convs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, nargs="+", default=[64, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in a.width:
            rows.append(measure(w, Path(tmp)))
            r = rows[-1]
            print(
                f"ResNet-18 width {w} ({r['params']:,} params, {a.threads} threads): "
                f"MM-BD {r['mmbd_s']:.1f} s wall, {r['mmbd_cpu_s']:.1f} s CPU ({r['mmbd_steps_run']} steps); "
                f"OTBR unlearning {r['otbr_unlearn_s']:.1f} s wall, {r['otbr_unlearn_cpu_s']:.1f} s CPU",
                flush=True,
            )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
