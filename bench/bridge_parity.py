"""Torch-bridge parity on the zoo: the bridge's logits against onnxruntime's for every zoo export present.

For each ``zoo/*/model.onnx`` and ``zoo/*/model.dynamo.onnx``: load with onnxclp's safe loader, run the same
inputs through :mod:`onnxclp.bridge` and onnxruntime, and report the largest absolute difference of the
logits (target: <= 1e-4). Inputs are uniform in [-2.5, 2.5] (CIFAR images after per-channel normalisation)
plus, with ``--images``, the first test images of the data set. Prints a Markdown table (for docs/bridge.md);
exit status 1 when a model exceeds the tolerance or cannot be bridged.

    python bench/bridge_parity.py [--zoo zoo] [--n 64] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def check(path: Path, n: int, seed: int = 0) -> dict:
    import onnxruntime as ort
    import torch

    from onnxclp.bridge import UnsupportedOp, input_spec, to_torch
    from onnxclp.io import load_model

    model, store = load_model(path)
    try:
        module = to_torch(model, store=store).eval()
    except UnsupportedOp as exc:
        return {"model": str(path), "error": exc.message}
    shape, dtype = input_spec(model)
    shape = tuple(n if d is None else d for d in shape)
    x = np.random.default_rng(seed).uniform(-2.5, 2.5, size=shape).astype(dtype)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    t_ort = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    t_torch = time.perf_counter() - t0
    return {
        "model": str(path),
        "max_abs_diff": float(np.max(np.abs(got - ref))),
        "max_abs_logit": float(np.max(np.abs(ref))),
        "argmax_agree": float(np.mean(got.argmax(1) == ref.argmax(1))),
        "n": int(shape[0]),
        "ort_s": t_ort,
        "torch_s": t_torch,
        "params": sum(p.numel() for p in module.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=Path(__file__).resolve().parent.parent / "zoo")
    ap.add_argument("--n", type=int, default=64, help="random inputs per model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    paths = sorted(p for pat in ("*/model.onnx", "*/model.dynamo.onnx") for p in a.zoo.glob(pat))
    if not paths:
        print(f"no zoo models under {a.zoo}", file=sys.stderr)
        return 1
    rows = [check(p, a.n) for p in paths]
    bad = 0
    print("| model | export | max abs diff | max abs logit | argmax agree | params |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        p = Path(r["model"])
        export = "dynamo" if p.name == "model.dynamo.onnx" else "torchscript"
        if "error" in r:
            bad += 1
            print(f"| {p.parent.name} | {export} | {r['error']} | | | |")
            continue
        bad += r["max_abs_diff"] > a.tol
        print(
            f"| {p.parent.name} | {export} | {r['max_abs_diff']:.2e} | {r['max_abs_logit']:.1f} | "
            f"{100 * r['argmax_agree']:.0f} % | {r['params']:,} |"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
