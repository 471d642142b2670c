"""Few-shot tier on the zoo: ACC / ASR before and after ANP and BNP, with 500 clean CIFAR-10 *training* images.

For every ``zoo/<name>/model.onnx`` with an ``attack.json``: takes 500 images of the training split of
``--cifar`` (seeded, x_train/y_train; saved as an .npz the loader reads, keys x_test/y_test), sanitizes with
each method's defaults (``onnxclp.api.sanitize_file``, mean/std from attack.json), evaluates ACC/ASR on the
test split with ``onnxclp.eval.api.evaluate`` (``--limit``: the first N test images) and writes
``docs/results-few-shot.md``. A method that refuses a model (BNP on a graph whose BatchNorm was folded) gets
its reason in the table. Run it nice'd: ``nice -n 10 python bench/few_shot_zoo.py [--limit 2000]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def clean_subset(cifar: Path, out: Path, n: int = 500, seed: int = 0) -> Path:
    """``n`` seeded images of the training split, saved with the keys the loader reads by default."""
    import numpy as np

    with np.load(cifar, allow_pickle=False) as d:
        x, y = d["x_train"], d["y_train"]
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
    np.savez(out, x_test=x[idx], y_test=y[idx])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT / "zoo")
    ap.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--methods", nargs="+", default=["anp", "bnp"])
    ap.add_argument("--models", nargs="*", default=None, help="zoo folder names (default: every one present)")
    ap.add_argument("--limit", type=int, default=None, help="test images evaluated (default: all 10,000)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results-few-shot.md")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    from onnxclp.api import sanitize_file
    from onnxclp.errors import OnnxclpError
    from onnxclp.eval.api import evaluate

    torch.set_num_threads(args.threads)
    models = sorted(p.parent for p in args.zoo.glob("*/model.onnx") if (p.parent / "attack.json").is_file())
    if args.models:
        models = [m for m in models if m.name in args.models]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = clean_subset(args.cifar, Path(tmp) / "clean500.npz")

        def measure(path: Path, cfg: Path) -> tuple[float, float]:
            r = evaluate(path, args.cifar, attack_config=cfg, limit=args.limit, threads=args.threads)
            return 100 * r.metrics.acc, 100 * r.metrics.asr

        for folder in models:
            cfg = folder / "attack.json"
            norm = json.loads(cfg.read_text()).get("normalize") or {}
            row: dict = {"model": folder.name, "before": measure(folder / "model.onnx", cfg)}
            print(folder.name, "before", row["before"], flush=True)
            for method in args.methods:
                out = Path(tmp) / f"{folder.name}-{method}.onnx"
                ctx = {"clean_data": clean, "clean_n": 500, "mean": norm.get("mean"), "std": norm.get("std")}
                t0 = time.perf_counter()
                try:
                    rep = sanitize_file(folder / "model.onnx", out, method, context=ctx)
                except OnnxclpError as exc:
                    row[method] = {"refused": exc.message.split(":")[0]}
                    print(folder.name, method, "refused", flush=True)
                    continue
                secs = time.perf_counter() - t0
                acc, asr = measure(out, cfg)
                t = rep.totals()
                row[method] = {"acc": acc, "asr": asr, "seconds": secs, "pruned": t["pruned_channels"],
                               "channels": t["channels"]}  # fmt: skip
                print(folder.name, method, row[method], flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    write_table(rows, args)


def write_table(rows: list[dict], args: argparse.Namespace) -> None:
    """docs/results-few-shot.md: one row per model, before and after each method."""
    methods = args.methods
    lines = [
        "| model | before ACC / ASR | " + " | ".join(f"{m.upper()} ACC / ASR (pruned, time)" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in rows:
        cells = [r["model"], "{:.2f} / {:.2f}".format(*r["before"])]
        for m in methods:
            v = r.get(m, {})
            if "refused" in v:
                cells.append("refused: " + v["refused"])
            else:
                cells.append(
                    f"{v['acc']:.2f} / {v['asr']:.2f} ({v['pruned']}/{v['channels']} ch, {v['seconds']:.0f} s)"
                )
        lines.append("| " + " | ".join(cells) + " |")
    n = "all 10,000" if args.limit is None else f"the first {args.limit:,}"
    table = "\n".join(lines)
    text = f"""# Few-shot tier on the zoo (ANP, BNP)

Generated by `bench/few_shot_zoo.py` ({args.threads} torch threads, nice 10, on the 2-core machine shared with
zoo training). Clean data: 500 CIFAR-10 **training** images (seed 0). ACC / ASR (%) measured with
`onnxclp.eval.api.evaluate` on {n} test images with the attack configuration the trainer wrote. Each method
at its defaults (docs/algorithms.md, "ANP" and "BNP / EP"). Time: `sanitize_file` wall time, load to save.

<!-- BEGIN generated: table -->
{table}
<!-- END generated: table -->
"""
    args.out.write_text(text)


if __name__ == "__main__":
    main()
