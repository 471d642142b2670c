"""Every registered defence on every backdoored zoo model: ACC / ASR before and after, pruned channels, time.

For each ``zoo/<name>/model.onnx`` (not the ``-clean-`` ones) the evaluation set is prepared once: a seeded
``--eval-n`` (default 3,000) of the CIFAR-10 test images (the test split is sorted by class, so a random subset
rather than the first N), with the attack of ``attack.json`` (trigger, target, normalisation). Each configuration
below sanitizes the model in memory with the method's **defaults** (BNP: ``model.bn.onnx``, the export that
keeps BatchNorm, where the zoo has it) (data-free ones with the model's mean/std for
their synthetic inputs; few-shot ones with 500 seeded CIFAR-10 *training* images) and is measured on that set.
Results are cached per (model, configuration) in ``docs/results-methods.json``, so the script can be rerun as
zoo models are added; ``docs/results-methods.md`` is regenerated from the cache each time.

Usage: ``nice python bench/zoo_methods.py [--models resnet-bpp ...] [--configs clp lpp ...]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CIFAR = REPO.parent / "shared" / "data" / "cifar10.npz"

# label -> (method, parameters, options); "context" marks configurations that read the model's normalisation
CONFIGS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "clp": ("clp", {}, {}),
    "clp-all": ("clp", {}, {"streams": "all"}),
    "lpp": ("lpp", {}, {}),
    "lpp-all": ("lpp", {}, {"streams": "all"}),
    "lpp-topk-mmbd": ("lpp", {"topk": 5, "target_from": "mmbd"}, {"context": True}),
    "otbr": ("otbr", {}, {"context": True}),
    "anp": ("anp", {}, {"context": True, "clean": True}),
    "bnp": ("bnp", {}, {"context": True, "clean": True}),
}


def clean_images(path: Path, n: int = 500, seed: int = 0) -> Path:
    with np.load(CIFAR, allow_pickle=False) as d:
        x, y = d["x_train"], d["y_train"]
    idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
    np.savez(path, x_test=x[idx], y_test=y[idx])
    return path


def run_config(proto, label: str, norm: dict, clean: Path, bn_proto=None) -> tuple[Any, Any] | str:
    from onnxclp.api import sanitize
    from onnxclp.errors import OnnxclpError

    method, params, opts = CONFIGS[label]
    context: dict[str, Any] = {}
    if opts.get("context"):
        context = {"mean": norm["mean"], "std": norm["std"], "device": "cpu"}
    if opts.get("clean"):
        context.update(clean_data=clean, clean_n=500)
    if method == "bnp" and bn_proto is not None:  # BNP reads BatchNorm statistics: the export that keeps them
        proto = bn_proto
    try:
        return sanitize(proto, method, context=context, streams=opts.get("streams", "strongest"), **params)
    except OnnxclpError as exc:
        return exc.message


def metrics(m) -> dict[str, float | None]:
    return {"acc": m.acc, "asr": m.asr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--eval-n", type=int, default=3000)
    ap.add_argument("--cache", type=Path, default=REPO / "docs" / "results-methods.json")
    args = ap.parse_args()

    from onnxclp.study.measure import load_inline, measure, prepare

    cache = json.loads(args.cache.read_text()) if args.cache.exists() else {}
    folders = sorted(p for p in args.zoo.iterdir() if (p / "model.onnx").exists() and "-clean-" not in p.name)
    if args.models:
        folders = [f for f in folders if f.name in args.models]
    with tempfile.TemporaryDirectory() as tmp:
        clean = clean_images(Path(tmp) / "clean500.npz")
        for folder in folders:
            entry = cache.setdefault(folder.name, {})
            todo = [c for c in args.configs if c not in entry]
            if not todo and "before" in entry:
                continue
            attack = json.loads((folder / "attack.json").read_text())
            train = json.loads((folder / "train.json").read_text())
            proto = load_inline(folder / "model.onnx")
            idx = np.sort(np.random.default_rng(12345).permutation(10_000)[: args.eval_n])
            prepared = prepare(proto, CIFAR, attack_config=folder / "attack.json", indices=idx)
            if "before" not in entry:
                entry["before"] = metrics(measure(proto, prepared))
                entry["train"] = {"epochs": train["epochs"], "attack": attack["attack"], "target": attack["target"]}
            for label in todo:
                t = time.perf_counter()
                bn = folder / "model.bn.onnx"
                out = run_config(proto, label, attack["normalize"], clean, load_inline(bn) if bn.exists() else None)
                seconds = time.perf_counter() - t
                if isinstance(out, str):
                    entry[label] = {"refused": out, "seconds": seconds}
                else:
                    model, report = out
                    entry[label] = {
                        **metrics(measure(model, prepared)),
                        "pruned": report.pruned_channels,
                        "channels": report.total_channels,
                        "seconds": seconds,
                    }
                print(folder.name, label, entry[label], flush=True)
                args.cache.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            args.cache.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    write_markdown(cache, args.cache.with_suffix(".md"), args.eval_n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_markdown(cache: dict, path: Path, eval_n: int) -> None:
    labels = [c for c in CONFIGS if any(c in e for e in cache.values())]
    lines = [
        "# Every defence on the zoo (generated by bench/zoo_methods.py)",
        "",
        f"ACC / ASR in % on a seeded {eval_n:,} of the CIFAR-10 test images (ASR over those whose label is not the "
        "target), each method at its defaults; pruned = channels zeroed; time = sanitize seconds on the shared "
        "2-core machine (loaded by training in the background). A method that refuses a model shows why.",
        "",
        "| model | epochs | before | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    sums: dict[str, list[tuple[float, float]]] = {c: [] for c in labels}
    for name, e in sorted(cache.items()):
        b = e["before"]
        cells = []
        for c in labels:
            r = e.get(c)
            if r is None:
                cells.append("n/a")
            elif "refused" in r:
                cells.append("refused: " + r["refused"][:60].replace("|", "/"))
            else:
                cells.append(f"{_pct(r['acc'])} / {_pct(r['asr'])} ({r['pruned']} ch, {r['seconds']:.0f} s)")
                sums[c].append((100 * (b["acc"] - r["acc"]), 100 * r["asr"]))
        lines.append(
            f"| {name} | {e['train']['epochs']} | {_pct(b['acc'])} / {_pct(b['asr'])} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Averages over the models each method ran on:",
        "",
        "| method | models | mean ACC drop (pt) | mean ASR (%) |",
        "|---|---|---|---|",
    ]
    for c in labels:
        if sums[c]:
            d, a = zip(*sums[c], strict=True)
            lines.append(f"| {c} | {len(d)} | {np.mean(d):.1f} | {np.mean(a):.1f} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
