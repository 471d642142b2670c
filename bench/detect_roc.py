"""The scan verdict's false-positive rate and ROC: fit the detectors' nulls on clean calibration models, measure on
held-out clean models and on the backdoored zoo, write docs/results-detect.md and docs/results-detect.json.

Models:

- **backdoored**: every ``zoo/*/model.onnx`` whose ``train.json`` (or ``attack.json``) has a poison rate > 0
  (``examples/build_zoo.sh``); the true target class from ``attack.json``;
- **clean, calibration**: ``zoo-null/*`` with ``split: calibration`` (``bench/null_models.py``): the nulls of
  :mod:`onnxclp.detect._null` are fitted on these (``--fit`` writes them into that module);
- **clean, held out**: ``zoo-null/*`` with ``split: heldout``, and any ``zoo/*`` with poison rate 0: the
  false-positive rates are measured on these only.

Each model is scanned once with every registered detector (``onnxclp.scanning.scan_model``, normalisation from the
folder's json); the raw p-values are kept in the json and reused on the next run (``--rescan`` to redo them), so
adding a finished zoo model costs one scan. Everything else is computed from the raw p-values: each detector's
p-value recalibrated with the fitted null, the combined verdict (Sidak min-p over the default detectors, the rule
``scan`` applies), Fisher's combination and the previous rule (Bonferroni on the uncalibrated p-values) for
comparison; per rule the AUC (backdoored vs held-out clean), the TPR at FPR <= 1 % (with fewer than 100 held-out
models: the TPR at the largest threshold that flags no held-out model), the operating point at ``--fpr`` (TPR and
FPR), per attack, and whether the target class was right per model. Time per model: wall and CPU seconds of the
whole scan (CPU seconds do not depend on other work sharing the machine).

Usage: ``python bench/detect_roc.py [--zoo zoo] [--null zoo-null] [--fit] [--rescan] [--fpr 0.01]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np

from onnxclp import detect
from onnxclp.detect import _null
from onnxclp.scanning import ScanConfig, scan_model

REPO = Path(__file__).resolve().parent.parent
NULL_PY = REPO / "onnxclp" / "detect" / "_null.py"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def collect(zoo: Path, null: Path) -> list[dict]:
    """Every model with its ground truth: role (backdoored / calibration / heldout), attack, target, normalisation."""
    models = []
    for folder in sorted(p for p in zoo.iterdir() if (p / "model.onnx").exists()) if zoo.is_dir() else []:
        train, attack = _json(folder / "train.json"), _json(folder / "attack.json")
        rate = train.get("poison_rate", attack.get("poison_rate"))
        if rate is None:
            continue  # still training (no train.json yet) or not a zoo model
        norm = attack.get("normalize") or train.get("normalize") or {}
        models.append({
            "model": f"{zoo.name}/{folder.name}", "path": str(folder / "model.onnx"),
            "role": "backdoored" if rate > 0 else "heldout", "attack": attack.get("attack") if rate > 0 else "none",
            "arch": train.get("arch"), "true_target": attack.get("target") if rate > 0 else None,
            "mean": norm.get("mean"), "std": norm.get("std"), "acc": (train.get("test") or {}).get("acc"),
        })  # fmt: skip
    for folder in sorted(p for p in null.iterdir() if (p / "model.onnx").exists()) if null.is_dir() else []:
        train = _json(folder / "train.json")
        norm = train.get("normalize") or {}
        models.append({
            "model": f"{null.name}/{folder.name}", "path": str(folder / "model.onnx"), "role": train["split"],
            "attack": "none", "arch": train.get("arch"), "true_target": None, "mean": norm.get("mean"),
            "std": norm.get("std"), "acc": train.get("test_acc"),
        })  # fmt: skip
    return models


def scan(m: dict, names: list[str]) -> dict:
    context = {"mean": m["mean"], "std": m["std"], "device": "cpu"}
    w, c = time.perf_counter(), time.process_time()
    r = scan_model(m["path"], ScanConfig(detectors=tuple(names), context=context))
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    if r["verdict"] == "error":
        raise SystemExit(f"{m['path']}: {r['error']}")
    return {
        "mtime": os.path.getmtime(m["path"]),
        "seconds_wall": round(wall, 2),
        "seconds_cpu": round(cpu, 2),
        "raw": {n: {k: d[k] for k in ("statistic", "p_value", "target", "detail")} for n, d in r["detectors"].items()},
        "skipped": r["detectors_skipped"],
    }


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a backdoored model's p-value < a clean one's); ties count 1/2."""
    if not pos or not neg:
        return math.nan
    return float(np.mean([(a < b) + 0.5 * (a == b) for a in pos for b in neg]))


def tpr_at_fpr(pos: list[float], neg: list[float], fpr: float) -> float:
    """The largest TPR of a threshold ``p < t`` that flags at most ``fpr`` of ``neg``."""
    if not pos:
        return math.nan
    allowed = math.floor(fpr * len(neg) + 1e-9)
    t = sorted(neg)[allowed] if allowed < len(neg) else math.inf  # flags the ``allowed`` smallest at most
    return float(np.mean([p < t for p in pos]))


def fisher(ps: list[float]) -> float:
    """Fisher's combination: P(chi2 with 2m degrees > -2 sum log p) (closed form for even degrees)."""
    x = -sum(math.log(max(p, 1e-300)) for p in ps)  # = chi2 / 2
    term, total = 1.0, 1.0
    for k in range(1, len(ps)):
        term *= x / k
        total += term
    return min(1.0, math.exp(-x) * total)


def write_null(fitted: dict[str, tuple[float, float, int]]) -> None:
    """Write the fitted nulls into onnxclp/detect/_null.py, keeping the entries fitted elsewhere (``nc``: clean images,
    bench/detect_fewshot_probe.py)."""
    fitted = {**_null.NULL, **fitted}
    body = "".join(f'    "{n}": ({mu:.4f}, {sigma:.4f}, {k}),\n' for n, (mu, sigma, k) in fitted.items())
    block = f"NULL: dict[str, tuple[float, float, int]] = {{\n{body}}}\n"
    text = NULL_PY.read_text()
    new = re.sub(r"NULL: dict\[str, tuple\[float, float, int\]\] = \{\n.*?\n\}\n", block, text, flags=re.S)
    NULL_PY.write_text(new)
    _null.NULL.clear()
    _null.NULL.update(fitted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--null", type=Path, default=REPO / "zoo-null")
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--fit", action="store_true", help="write the fitted nulls into onnxclp/detect/_null.py")
    ap.add_argument("--rescan", action="store_true", help="scan every model again (else reuse the json's p-values)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results-detect.json")
    args = ap.parse_args()

    # every registered detector but nc, which needs each model's clean images (bench/detect_nc_roc.py measures it)
    names = [n for n in detect.names() if n != "nc"]
    default = detect.default_names()
    old = {r["model"]: r for r in _json(args.out).get("models", [])}
    rows = []
    for m in collect(args.zoo, args.null):
        prev = old.get(m["model"])
        if (
            prev
            and not args.rescan
            and prev.get("mtime") == os.path.getmtime(m["path"])
            and set(prev["raw"]) | set(prev["skipped"]) >= set(names)
        ):
            rows.append({**m, **{k: prev[k] for k in ("mtime", "seconds_wall", "seconds_cpu", "raw", "skipped")}})
            continue
        rows.append({**m, **scan(m, names)})
        r = rows[-1]
        ps = "  ".join(f"{n} p={d['p_value']:.3g} t={d['target']}" for n, d in r["raw"].items())
        print(f"{m['model']:<34} {m['role']:<11} {r['seconds_wall']:6.1f} s  {ps}", flush=True)

    calib = [r for r in rows if r["role"] == "calibration"]
    fitted = {n: _null.fit([r["raw"][n]["p_value"] for r in calib if n in r["raw"]]) for n in names}
    if args.fit:
        write_null(fitted)
    if any(abs(_null.NULL.get(n, (0, 1, 0))[0] - f[0]) > 1e-3 or abs(_null.NULL.get(n, (0, 1, 0))[1] - f[1]) > 1e-3
           for n, f in fitted.items()):  # fmt: skip
        print("warning: onnxclp/detect/_null.py differs from the nulls fitted here: rerun with --fit")
    null = dict(_null.NULL)

    # every rule's p-value per model
    def rules(r: dict) -> dict[str, dict]:
        raw = {n: d for n, d in r["raw"].items() if d["p_value"] is not None}
        cal = {n: _null.calibrate(n, d["p_value"], null) for n, d in raw.items()}
        out = {}
        for n, d in raw.items():
            out[n] = {"p": cal[n], "p_own": d["p_value"], "target": d["target"]}
        ran = [n for n in default if n in cal]
        if ran:
            best = min(ran, key=lambda n: cal[n])
            named = [n for n in ran if raw[n]["target"] is not None]
            tgt = raw[min(named, key=lambda n: cal[n])]["target"] if named else None
            out["combined"] = {"p": _null.combine([cal[n] for n in ran]), "target": tgt, "most_significant": best}
            out["fisher"] = {"p": fisher([cal[n] for n in ran]), "target": tgt}
            out["bonferroni-raw"] = {"p": min(1.0, len(ran) * min(raw[n]["p_value"] for n in ran)), "target": tgt}
        return out

    for r in rows:
        r["rules"] = rules(r)
    rule_names = [*names, "combined", "fisher", "bonferroni-raw"]
    pos_rows = [r for r in rows if r["role"] == "backdoored"]
    held = [r for r in rows if r["role"] == "heldout"]
    summary = {}
    for n in rule_names:
        pos = [r["rules"][n]["p"] for r in pos_rows if n in r["rules"]]
        neg = [r["rules"][n]["p"] for r in held if n in r["rules"]]
        cal_neg = [r["rules"][n]["p"] for r in calib if n in r["rules"]]
        detected = [r for r in pos_rows if n in r["rules"] and r["rules"][n]["p"] < args.fpr]
        per_attack = {}
        for a in sorted({r["attack"] for r in pos_rows}):
            these = [r for r in pos_rows if r["attack"] == a and n in r["rules"]]
            per_attack[a] = {
                "models": len(these),
                "detected": sum(r["rules"][n]["p"] < args.fpr for r in these),
                "auc": auc([r["rules"][n]["p"] for r in these], neg),
                "tpr_at_1": tpr_at_fpr([r["rules"][n]["p"] for r in these], neg, 0.01),
            }
        summary[n] = {
            "auc": auc(pos, neg),
            "tpr_at_1": tpr_at_fpr(pos, neg, 0.01),
            "tpr_at_fpr": float(np.mean([p < args.fpr for p in pos])) if pos else math.nan,
            "fpr_heldout": float(np.mean([p < args.fpr for p in neg])) if neg else math.nan,
            "fpr_calibration": float(np.mean([p < args.fpr for p in cal_neg])) if cal_neg else math.nan,
            "fpr_heldout_at_5": float(np.mean([p < 0.05 for p in neg])) if neg else math.nan,
            "positives": len(pos),
            "negatives": len(neg),
            "target_right": sum(r["rules"][n].get("target") == r["true_target"] for r in detected),
            "detected": len(detected),
            "per_attack": per_attack,
        }
    zc = {n: [_null.p_to_z(r["raw"][n]["p_value"]) for r in calib if n in r["raw"]] for n in default}
    corr = (
        float(np.corrcoef(zc[default[0]], zc[default[1]])[0, 1])
        if len(default) == 2 and len(zc[default[0]]) == len(zc[default[1]]) > 2
        else None
    )
    times = {r["model"]: {"wall": r["seconds_wall"], "cpu": r["seconds_cpu"]} for r in pos_rows}
    for r in rows:  # no machine-specific paths in the json (the model key names it)
        r.pop("path", None)
    out = {"fpr": args.fpr, "null": {n: list(v) for n, v in null.items()}, "default": default,
           "calibration_corr_z": corr, "summary": summary, "models": rows, "times_backdoored": times}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    md = render(out, args.fpr)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f} %"


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def render(out: dict, fpr: float) -> str:
    s, rows = out["summary"], out["models"]
    pos = [r for r in rows if r["role"] == "backdoored"]
    held = [r for r in rows if r["role"] == "heldout"]
    calib = [r for r in rows if r["role"] == "calibration"]
    default = out["default"]
    lines = [
        "# The scan verdict measured: held-out false-positive rate and ROC (generated by bench/detect_roc.py)",
        "",
        f"Backdoored models: **{len(pos)}** (`zoo/`: " + ", ".join(f"{r['model'].split('/')[1]}" for r in pos) + ")."
        f" Clean models: **{len(calib)}** used to fit the nulls (calibration) and **{len(held)}** held out, on which"
        f" every false-positive rate below is measured (`bench/null_models.py`). Rule of the verdict: each p-value"
        f" recalibrated with its null, Sidak min-p over the default detectors ({', '.join(default)}), suspicious at"
        f" p < `--fpr` = {fpr}. With {len(held)} held-out models a false-positive rate resolves to"
        f" 1/{len(held)} = {100 / max(len(held), 1):.1f} %: 'TPR at FPR 1 %' is the TPR at the largest threshold that"
        " flags none of them; with "
        f"{len(pos)} backdoored models each one is {100 / max(len(pos), 1):.0f} points of TPR.",
        "",
        "## Per detector and rule",
        "",
        f"| rule | AUC | TPR at FPR 1 % | at p < {fpr}: TPR | FPR held out | FPR calibration | FPR held out at p < 0.05 "
        "| target right (of detected) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    label = {"combined": "**combined (the verdict)**", "fisher": "Fisher (for comparison)",
             "bonferroni-raw": "previous rule: Bonferroni, uncalibrated"}  # fmt: skip
    for n, v in s.items():
        name = label.get(n, n + ("" if n in default else " (opt-in)"))
        lines.append(
            f"| {name} | {_p(v['auc'])} | {_pct(v['tpr_at_1'])} | {_pct(v['tpr_at_fpr'])} | {_pct(v['fpr_heldout'])}"
            f" ({v['negatives']}) | {_pct(v['fpr_calibration'])} | {_pct(v['fpr_heldout_at_5'])} |"
            f" {v['target_right']} of {v['detected']} |"
        )
    attacks = sorted({r["attack"] for r in pos})
    lines += ["", f"## Per attack (detected at p < {fpr} / models; AUC against the held-out clean models)", "",
              "| rule | " + " | ".join(attacks) + " |", "|---|" + "---|" * len(attacks)]  # fmt: skip
    for n, v in s.items():
        cells = [f"{a['detected']}/{a['models']} (AUC {_p(a['auc'])})" for a in (v["per_attack"][k] for k in attacks)]
        lines.append(f"| {label.get(n, n)} | " + " | ".join(cells) + " |")
    names = [n for n in s if n not in ("combined", "fisher", "bonferroni-raw")]
    lines += ["", "## Every model", "",
              "p-values calibrated (own p-value in brackets) and target class per detector; `combined` is the model's"
              " p-value. Time: the whole scan, wall and CPU seconds, every detector run.", "",
              "| model | role | attack (target) | " + " | ".join(names) + " | combined | verdict | wall / CPU s |",
              "|---|---|---|" + "---|" * len(names) + "---|---|---|"]  # fmt: skip
    for r in rows:
        cells = []
        for n in names:
            d = r["rules"].get(n)
            if d is None:
                cells.append("skipped")
                continue
            t = "" if d["target"] is None else f", t={d['target']}"
            cells.append(f"{_p(d['p'])} ({_p(d['p_own'])}){t}")
        c = r["rules"].get("combined", {})
        verdict = "suspicious" if c.get("p", 1.0) < fpr else "clean"
        right = ""
        if r["role"] == "backdoored" and verdict == "suspicious":
            right = " (target right)" if c.get("target") == r["true_target"] else " (target wrong)"
        attack = "-" if r["attack"] == "none" else f"{r['attack']} ({r['true_target']})"
        lines.append(
            f"| {r['model']} | {r['role']} | {attack} | "
            + " | ".join(cells)
            + f" | {_p(c.get('p'))} | {verdict}{right} | {r['seconds_wall']:.1f} / {r['seconds_cpu']:.1f} |"
        )
    lines += ["", "## The nulls (fitted on the calibration models)", "",
              "`z = Phi^-1(1 - p)` of each detector's own p-value on the calibration models: mean `mu` and standard"
              " deviation `sigma` (floored at 0 and 1), n models; the calibrated p-value is `1 - Phi((z - mu) / sigma)`."
              f" Correlation of the default detectors' z on the calibration models: {_p(out['calibration_corr_z'])}.",
              "", "| detector | mu | sigma | n |", "|---|---|---|---|"]  # fmt: skip
    for n, (mu, sigma, k) in out["null"].items():
        lines.append(f"| {n} | {mu:.2f} | {sigma:.2f} | {k} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
