"""Model-level detectors on the zoo: statistics, p-values, ROC (AUC, TPR at 5 % / 10 % FPR) and a figure.

Every ``zoo/*/model.onnx`` is scanned with ``onnxclp.scanning.scan_model`` (CLP's scores, every registered
detector that runs without extras, plus those named with ``--detector``); a model is a positive when its folder
name has no ``-clean-`` (``examples/build_zoo.sh`` trains the clean ones with ``--poison-rate 0``). Writes
``docs/detect-roc.json`` (every statistic), ``docs/img/detect-roc.png`` and prints the table for docs/detect.md.

The ROC of a detector ranks the models by its p-value (smaller = more suspicious); "TPR at x % FPR" is the
fraction of backdoored models whose p-value is below the largest threshold that flags at most x % of the clean
models (with few clean models, 0 % FPR is the only reachable point below 1/n). The verdict's own operating point
(``--fpr 0.05``, Bonferroni over the default detectors) is reported beside it: the measured FPR and TPR.

Usage: ``python bench/detect_roc.py [--zoo zoo] [--detector mmbd ...]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnxclp import detect
from onnxclp.scanning import ScanConfig, scan_model

REPO = Path(__file__).resolve().parent.parent


def roc(p_pos: list[float], p_neg: list[float]) -> tuple[float, list[tuple[float, float]]]:
    """AUC (probability that a backdoored model has a smaller p-value than a clean one; ties count 1/2) and the
    ROC points (FPR, TPR) over every threshold."""
    pos, neg = np.asarray(p_pos), np.asarray(p_neg)
    auc = (
        float(np.mean([(pp < nn) + 0.5 * (pp == nn) for pp in pos for nn in neg]))
        if len(pos) and len(neg)
        else float("nan")
    )
    thresholds = np.unique(np.concatenate([pos, neg, [np.inf]]))
    points = [(0.0, 0.0)] + [(float(np.mean(neg <= t)), float(np.mean(pos <= t))) for t in thresholds]
    return auc, sorted(set(points))


def tpr_at(points: list[tuple[float, float]], fpr: float) -> float:
    return max((t for f, t in points if f <= fpr + 1e-12), default=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--detector", action="append", default=[], help="also run these detectors (e.g. mmbd)")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "detect-roc.json")
    ap.add_argument("--plot", default=str(REPO / "docs" / "img" / "detect-roc.png"), help="PNG path ('' for none)")
    args = ap.parse_args()

    names = list(dict.fromkeys(detect.default_names() + args.detector))
    rows = []
    for folder in sorted(p for p in args.zoo.iterdir() if (p / "model.onnx").exists()):
        t = time.perf_counter()
        attack = json.loads((folder / "attack.json").read_text()) if (folder / "attack.json").exists() else {}
        norm = attack.get("normalize") or {}
        context = {"mean": norm.get("mean"), "std": norm.get("std"), "device": "cpu"}  # for mmbd's synthetic images
        r = scan_model(str(folder / "model.onnx"), ScanConfig(detectors=tuple(names), fpr=args.fpr, context=context))
        clean = "-clean-" in folder.name
        rows.append(
            {
                "model": folder.name,
                "backdoored": not clean,
                "true_target": None if clean else attack.get("target"),
                "verdict": r["verdict"],
                "target": r["target"],
                "detectors": r["detectors"],
                "seconds": time.perf_counter() - t,
            }
        )
        d = "  ".join(
            f"{n} p={v['p_value']:.3g} (stat {v['statistic']:.2f}, t={v['target']})" for n, v in r["detectors"].items()
        )
        print(f"{folder.name:<22} {'backdoor' if not clean else 'clean':<8} -> {r['verdict']:<10} {d}", flush=True)

    summary = {}
    for n in names:
        pos = [r["detectors"][n]["p_value"] for r in rows if r["backdoored"] and n in r["detectors"]]
        neg = [r["detectors"][n]["p_value"] for r in rows if not r["backdoored"] and n in r["detectors"]]
        auc, points = roc(pos, neg)
        hits = [r for r in rows if r["backdoored"] and n in r["detectors"] and r["detectors"][n]["target"] is not None]
        summary[n] = {
            "auc": auc,
            "tpr_at_5": tpr_at(points, 0.05),
            "tpr_at_10": tpr_at(points, 0.10),
            "positives": len(pos),
            "negatives": len(neg),
            "points": points,
            "target_correct": sum(r["detectors"][n]["target"] == r["true_target"] for r in hits),
            "target_named": len(hits),
            # the detector alone at the nominal level fpr (no Bonferroni)
            "tpr_at_nominal": float(np.mean([p < args.fpr for p in pos])) if pos else None,
            "fpr_at_nominal": float(np.mean([p < args.fpr for p in neg])) if neg else None,
        }
    default = detect.default_names()
    for r in rows:  # the verdict of the default gate alone (the run above may include opt-in detectors)
        ps = [r["detectors"][n]["p_value"] for n in default if n in r["detectors"]]
        r["gate"] = "suspicious" if ps and min(ps) < args.fpr / len(ps) else "clean"
    pos_rows = [r for r in rows if r["backdoored"]]
    neg_rows = [r for r in rows if not r["backdoored"]]
    gate = {
        "detectors": detect.default_names(),
        "fpr_setting": args.fpr,
        "tpr": float(np.mean([r["gate"] == "suspicious" for r in pos_rows])) if pos_rows else None,
        "fpr": float(np.mean([r["gate"] == "suspicious" for r in neg_rows])) if neg_rows else None,
        "positives": len(pos_rows),
        "negatives": len(neg_rows),
    }
    args.out.write_text(json.dumps({"models": rows, "detectors": summary, "gate": gate}, indent=1) + "\n")
    md = [
        "# Detector ROC on the zoo (generated by bench/detect_roc.py)",
        "",
        "| model | kind | default verdict | " + " | ".join(f"{n} p (target)" for n in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = []
        for n in names:
            d = r["detectors"].get(n)
            cells.append(
                "-" if d is None else f"{d['p_value']:.2g}" + (f" ({d['target']})" if d["target"] is not None else "")
            )
        kind = f"backdoor (target {r['true_target']})" if r["backdoored"] else "clean"
        md.append(f"| {r['model']} | {kind} | {r['gate']} | " + " | ".join(cells) + " |")
    md += [
        "",
        "| detector | AUC | TPR at 5 % FPR | TPR at 10 % FPR | alone at p < 0.05: TPR / FPR | target right |",
        "|---|---|---|---|---|---|",
    ]
    for n, s in summary.items():
        md.append(
            f"| {n} | {s['auc']:.2f} | {100 * s['tpr_at_5']:.0f} % | {100 * s['tpr_at_10']:.0f} % | "
            f"{100 * (s['tpr_at_nominal'] or 0):.0f} % / {100 * (s['fpr_at_nominal'] or 0):.0f} % | "
            f"{s['target_correct']} of {s['target_named']} |"
        )
    md.append(
        f"\nDefault gate ({', '.join(gate['detectors'])}; --fpr {args.fpr}): flags {gate['tpr']:.0%} of "
        f"{gate['positives']} backdoored models and {gate['fpr']:.0%} of {gate['negatives']} clean ones."
    )
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.2))
        for n, s in summary.items():
            f, t = zip(*s["points"], strict=True)
            ax.step(f, t, where="post", label=f"{n} (AUC {s['auc']:.2f})")
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
        ax.set_xlabel("false-positive rate (clean zoo models)")
        ax.set_ylabel("true-positive rate (backdoored zoo models)")
        ax.set_title(f"onnxclp scan detectors: {gate['positives']} backdoored, {gate['negatives']} clean", fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
