"""Reproduce docs/results.md, docs/results-headline.md, the tables of docs/lpp-defaults.md and the figures in
docs/img/ from the backdoored model zoo (``examples/train_backdoored.py``, one folder per model in ``zoo/``).

    python bench/reproduce.py                       # everything, for every zoo model present (zoo/)
    python bench/reproduce.py --steps table,tac     # some steps; results of earlier runs are kept in the cache
    python bench/reproduce.py --only resnet-badnets,resnet-blended --steps defaults

Protocol (the same for every model and method):
- data: CIFAR-10 test set (../shared/data/cifar10.npz). 500 test images, drawn with seed 12345, are the
  *calibration* set (clean images only, used by ``--calibrate`` and nothing else); every ACC and ASR is measured
  on the other 9,500 (``--eval-limit`` for a seeded subset of them). Sweeps and the LPP-defaults grid use a
  seeded 2,000 of those 9,500 (``--sweep-limit``). ASR counts the triggered images whose true label is not the
  target (docs/algorithms.md, "Metrics").
- before: the model as exported (``model.onnx``, TorchScript exporter). CLP and LPP: ``onnxclp.sanitize`` with
  the defaults of the method registry (``onnxclp methods --json``) at the time of the run (written in the tables). Calibrated: CLP and LPP
  with u chosen by ``onnxclp.study.calibrate`` on the calibration set (budget 1.0 point, grid 0.5:8:0.25).
- sanitize time: ``onnxclp.sanitize_file`` (load, score, edit, save), median of 3 runs, this machine.
- ablation: each channel CLP or LPP prunes at its default, pruned alone, on the sweep images.

Every number in the docs comes from a run of this script; ``zoo/reproduce-cache.json`` holds the raw results.
Sections between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->`` are rewritten; the text
around them is left alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "cifar10.npz"
DOCS = REPO / "docs"
IMG = DOCS / "img"
README = REPO / "README.md"

# (folder, architecture, attack) in table order
MODELS = [
    ("resnet-badnets", "ResNet-14", "BadNets"),
    ("resnet-blended", "ResNet-14", "Blended"),
    ("resnet-wanet", "ResNet-14", "WaNet"),
    ("resnet-sig", "ResNet-14", "SIG"),
    ("resnet-bpp", "ResNet-14", "BPP"),
    ("vgg-badnets", "VGG-BN", "BadNets"),
    ("preact-badnets", "PreAct ResNet", "BadNets"),
    ("mobilenet-badnets", "MobileNetV2-style", "BadNets"),
]
SWEEP_MODELS = ("resnet-badnets", "resnet-wanet", "resnet-blended", "resnet-bpp", "resnet-sig", "vgg-badnets")
TAC_MODELS = ("resnet-wanet", "resnet-sig", "vgg-badnets", "resnet-badnets", "resnet-blended", "resnet-bpp")
DEFAULTS_MODELS = ("resnet-badnets", "resnet-blended", "resnet-wanet", "resnet-sig", "resnet-bpp")
CALIBRATION_SEED = 12345
CALIBRATION_SIZE = 500
MAX_ACC_DROP = 1.0

# Published after-defense figures for the headline table, ACC / ASR (%), ResNet-18, CIFAR-10 (the full ones below).
PUBLISHED_SHORT = {
    "BadNets": "CLP 93.46 / 1.38 [C]; CLP 84.82 / 3.97, LPP 85.51 / 2.81 [L]",
    "Blended": "CLP 94.07 / 1.90 [C]",
    "WaNet": "CLP 94.06 / 0.56 [C]; CLP 68.97 / 96.22, LPP 87.64 / 44.57 [L]",
    "BPP": "CLP 90.31 / 2.86, LPP 90.32 / 2.79 [L]",
    "SIG": "not reported",
}

# Published figures, CIFAR-10, ResNet-18, 10 % poisoning: "before -> after" ACC / ASR
# (docs/algorithms.md, "Published figures").
PUBLISHED = {
    "BadNets": "CLP paper: 93.86/100.00 → CLP 93.46/1.38; LPP paper: 88.79/94.96 → CLP 84.82/3.97, LPP 85.51/2.81",
    "Blended": "CLP paper: 94.17/99.62 → CLP 94.07/1.90",
    "WaNet": "CLP paper: 94.50/99.67 → CLP 94.06/0.56; LPP paper: 86.06/99.25 → CLP 68.97/96.22, LPP 87.64/44.57",
    "BPP": "LPP paper: 90.34/99.48 → CLP 90.31/2.86, LPP 90.32/2.79",
    "SIG": "not in either paper (nearest: CLP paper's clean-label CLA 93.14/100.00 → CLP 91.89/2.84)",
}


# --------------------------------------------------------------------------------------------------------------
# data splits


def splits(n_test: int, eval_limit: int | None, sweep_limit: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(CALIBRATION_SEED)
    calib = np.sort(rng.choice(n_test, CALIBRATION_SIZE, replace=False))
    rest = np.setdiff1d(np.arange(n_test), calib)
    evaluation = rest if eval_limit is None or eval_limit >= rest.size else np.sort(rng.choice(rest, eval_limit, False))
    sweep = np.sort(rng.choice(evaluation, min(sweep_limit, evaluation.size), replace=False))
    return {"calibration": calib, "evaluation": evaluation, "sweep": sweep}


# --------------------------------------------------------------------------------------------------------------
# steps


def _metrics(m: Any) -> dict[str, Any]:
    return {"acc": m.acc, "asr": m.asr, "ra": m.ra, "n": m.clean_total, "n_attacked": m.attack_total}


def _file_time(path: Path, method: str, **kw: Any) -> float:
    from onnxclp.api import sanitize_file

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):
            t0 = time.perf_counter()
            sanitize_file(path, Path(tmp) / "out.onnx", method, force=True, **kw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_table(name: str, folder: Path, data: Path, idx: dict[str, np.ndarray]) -> dict[str, Any]:
    import onnxclp
    from onnxclp import methods

    DEFAULTS = {m: methods.get(m).defaults() for m in methods.names()}
    from onnxclp.eval.attacks import load_attack_config
    from onnxclp.study.calibrate import calibrate
    from onnxclp.study.measure import load_inline, measure, prepare
    from onnxclp.study.sweep import parse_grid

    path = folder / "model.onnx"
    proto = load_inline(path)
    cfg = load_attack_config(folder / "attack.json")
    norm = cfg.normalize or {"mean": None, "std": None}
    ev = prepare(proto, data, attack_config=folder / "attack.json", indices=idx["evaluation"])
    cal = prepare(proto, data, "none", mean=norm["mean"], std=norm["std"], indices=idx["calibration"])
    out: dict[str, Any] = {"before": _metrics(measure(proto, ev)), "defaults": json.loads(json.dumps(DEFAULTS))}
    for method in ("clp", "lpp"):
        model, report = onnxclp.sanitize(proto, method)
        out[method] = {
            **_metrics(measure(model, ev)),
            "u": report.params["u"],
            "pruned": report.pruned_channels,
            "rescaled": report.rescaled_channels,
            "channels": report.total_channels,
            "time_s": _file_time(path, method),
        }
        c = calibrate(proto, cal, method, MAX_ACC_DROP, parse_grid("0.5:8:0.25"))
        entry: dict[str, Any] = {"u": c.u, "calibration_acc_before": c.acc_before, "calibration_acc": c.acc_after}
        entry["tried"] = len(c.tried)
        if c.u is not None:
            model, report = onnxclp.sanitize(proto, method, c.u)
            entry.update(_metrics(measure(model, ev)), pruned=report.pruned_channels, rescaled=report.rescaled_channels)
        out[f"{method}_calibrated"] = entry
    return out


def step_sweep(name: str, folder: Path, data: Path, idx: dict[str, np.ndarray]) -> dict[str, Any]:
    from onnxclp.study.measure import load_inline, measure, prepare
    from onnxclp.study.plots import plot_sweeps
    from onnxclp.study.sweep import parse_grid, sweep

    proto = load_inline(folder / "model.onnx")
    prepared = prepare(proto, data, attack_config=folder / "attack.json", indices=idx["sweep"])
    base = measure(proto, prepared)
    us = parse_grid("0.5:8:0.5")
    results = [sweep(proto, prepared, us, m, name=str(folder / "model.onnx"), baseline=base) for m in ("clp", "lpp")]
    titles = [f"{name}: {m.upper()} ({prepared.n_samples} test images)" for m in ("CLP", "LPP")]
    plot_sweeps(results, IMG / f"sweep-{name}.png", titles)
    return {m: r.to_dict() for m, r in zip(("clp", "lpp"), results, strict=True)}


def step_tac(name: str, folder: Path, data: Path, idx: dict[str, np.ndarray]) -> dict[str, Any]:
    from onnxclp.study.measure import load_inline, prepare
    from onnxclp.study.plots import plot_tac
    from onnxclp.study.tac import tac

    proto = load_inline(folder / "model.onnx")
    prepared = prepare(proto, data, attack_config=folder / "attack.json", indices=idx["sweep"][::2])
    out = {}
    for method in ("clp", "lpp"):
        result = tac(proto, prepared, method, name=str(folder / "model.onnx"))
        if method == "clp":
            plot_tac(result, IMG / f"tac-{name}.png")
        out[method] = result.to_dict()
    return out


def prune_only(proto: Any, channels: list[tuple[str, int]]) -> Any:
    """A copy of ``proto`` with exactly these (layer, channel) pairs pruned, as sanitize prunes them."""
    import onnx

    from onnxclp.edit import Editor
    from onnxclp.graph import GraphIndex
    from onnxclp.io import TensorStore
    from onnxclp.layers import find_layers

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    store = TensorStore(model, Path("."))
    index = GraphIndex(model.graph)
    layers = {layer.key: layer for layer in find_layers(index, store).layers}
    editor = Editor(index, store)
    for key, k in channels:
        editor.zero_channels(layers[key], [k])
    return model


def step_ablate(name: str, folder: Path, data: Path, idx: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each channel CLP or LPP prunes at its default, pruned alone: which one carries the backdoor, which one
    costs the accuracy (LPP's rescaled channels are left out: a pruned channel is the sharper question)."""
    import onnxclp
    from onnxclp.study.measure import load_inline, measure, prepare

    proto = load_inline(folder / "model.onnx")
    prepared = prepare(proto, data, attack_config=folder / "attack.json", indices=idx["sweep"])
    out: dict[str, Any] = {"before": _metrics(measure(proto, prepared))}
    for method in ("clp", "lpp"):
        report = onnxclp.scan(proto, method)
        rows, pruned = [], []
        for layer in report.layers:
            mean, std = layer.score_mean, layer.score_std
            for k in layer.pruned:
                pruned.append((layer.node, k))
                z = (layer.scores[k] - mean) / std if std > 0 else 0.0
                m = measure(prune_only(proto, [(layer.node, k)]), prepared)
                rows.append({"node": layer.node, "channel": k, "score_z": z, **_metrics(m)})
        together = _metrics(measure(prune_only(proto, pruned), prepared)) if pruned else None
        out[method] = {"channels": rows, "together": together}
    return out


def defaults_grid() -> list[dict[str, Any]]:
    """One factor at a time around the provisional defaults (u 3, u_low -3, b 1.5, k 0), plus some pairs."""
    base = {"u": 3.0, "u_low": -3.0, "bias_rate": 1.5, "topk": 0}
    grid = [dict(base)]
    for key, values in (
        ("u", [2.0, 2.5, 3.5, 4.0, 5.0]),
        ("u_low", [-100.0, -4.0, -2.5, -2.0, -1.5]),
        ("bias_rate", [0.0, 0.5, 1.0, 2.0, 3.0]),
        ("topk", [1, 3, 10, 30]),
    ):
        grid += [{**base, key: v} for v in values]
    for u in (2.5, 3.5):
        for b in (0.0, 1.0, 2.0):
            grid.append({**base, "u": u, "bias_rate": b})
    for u_low in (-4.0, -2.0):
        for u in (2.5, 3.5):
            grid.append({**base, "u": u, "u_low": u_low})
    for u, b in ((3.0, 0.0), (3.0, 1.0), (3.5, 0.0), (3.5, 1.0), (4.0, 0.0), (4.0, 1.0)):
        for k in (10, 30):
            grid.append({**base, "u": u, "bias_rate": b, "topk": k})
    for k in (10, 30):  # u = 100: nothing pruned or rescaled, the top-k step alone
        grid.append({**base, "u": 100.0, "bias_rate": 0.0, "topk": k})
    return grid


def step_defaults(name: str, folder: Path, data: Path, idx: dict[str, np.ndarray]) -> dict[str, Any]:
    from onnxclp.study.measure import load_inline, prepare
    from onnxclp.study.sweep import sweep_settings

    proto = load_inline(folder / "model.onnx")
    prepared = prepare(proto, data, attack_config=folder / "attack.json", indices=idx["sweep"])
    return sweep_settings(proto, prepared, defaults_grid(), "lpp", name=str(folder / "model.onnx")).to_dict()


STEPS = {
    "table": step_table,
    "sweep": step_sweep,
    "tac": step_tac,
    "defaults": step_defaults,
    "ablate": step_ablate,
}
STEP_MODELS = {"sweep": SWEEP_MODELS, "tac": TAC_MODELS, "defaults": DEFAULTS_MODELS}


# --------------------------------------------------------------------------------------------------------------
# markdown


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def pair(d: dict[str, Any] | None) -> str:
    if not d or d.get("acc") is None:
        return "–"
    return f"{pct(d['acc'])} / {pct(d['asr'])}"


def _label(name: str) -> tuple[str, str]:
    for folder, arch, attack in MODELS:
        if folder == name:
            return arch, attack
    return name, ""


def _training(cache: dict[str, Any], folder: str) -> str:
    tr = cache.get(folder, {}).get("train", {})
    if not tr:
        return "?"
    return f"{tr.get('n_train', 0) / 1000:g}k images, {tr.get('epochs', '?')} epochs"


def md_table(cache: dict[str, Any], headline: bool = False) -> str:
    """The results table; ``headline`` drops calibrated LPP and adds the training and the published figures."""
    head = ["model", "attack", "before", "CLP", "LPP", "calibrated CLP (u)"]
    head += ["training", "sanitize time CLP / LPP", "published (ResNet-18)"] if headline else ["calibrated LPP (u)"]
    head += [] if headline else ["sanitize time CLP / LPP"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for folder, arch, attack in MODELS:
        r = cache.get(folder, {}).get("table")
        if not r:
            continue
        cal = []
        for method in ("clp", "lpp"):
            c = r[f"{method}_calibrated"]
            cal.append(f"{pair(c)} ({c['u']:g})" if c.get("u") is not None else "no u within budget")
        cells = [arch, attack, pair(r["before"]), pair(r["clp"]), pair(r["lpp"]), cal[0]]
        time_cell = f"{1000 * r['clp']['time_s']:.0f} / {1000 * r['lpp']['time_s']:.0f} ms"
        if headline:
            published = PUBLISHED_SHORT.get(attack, "") if arch == "ResNet-14" else "(ResNet-18 only)"
            cells += [_training(cache, folder), time_cell, published]
        else:
            cells += [cal[1], time_cell]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def md_details(cache: dict[str, Any]) -> str:
    rows = [
        "| model | test images (attacked) | CLP pruned | LPP pruned / rescaled | calibration ACC (500 clean) "
        "before → CLP-cal / LPP-cal | training (ACC / ASR in torch, 10k test; time on 2 CPU cores) |",
        "|---|---|---|---|---|---|",
    ]
    for folder, arch, attack in MODELS:
        r = cache.get(folder, {}).get("table")
        if not r:
            continue
        tr = cache[folder].get("train", {})
        test = tr.get("test", {})
        cc, lc = r["clp_calibrated"], r["lpp_calibrated"]
        rows.append(
            f"| {arch} {attack} | {r['before']['n']} ({r['before']['n_attacked']}) | "
            f"{r['clp']['pruned']} of {r['clp']['channels']} | {r['lpp']['pruned']} / {r['lpp']['rescaled']} of "
            f"{r['lpp']['channels']} | {pct(cc['calibration_acc_before'])} → {pct(cc.get('calibration_acc'))} / "
            f"{pct(lc.get('calibration_acc'))} | {tr.get('epochs', '?')} epochs on {tr.get('n_train', '?')} images: "
            f"{pct(test.get('acc'))} / {pct(test.get('asr'))}, {tr.get('seconds_train', 0) / 60:.0f} min |"
        )
    some = next((cache[f]["table"] for f, _, _ in MODELS if cache.get(f, {}).get("table")), None)
    if some:
        d = some["defaults"]
        rows.append("")
        rows.append(
            f"Defaults used: CLP u = {d['clp']['u']:g} (score {d['clp']['score']}); LPP u = {d['lpp']['u']:g}, "
            f"u_low = {d['lpp']['u_low']:g}, bias rate = {d['lpp']['bias_rate']:g}, top-k = {d['lpp']['topk']} "
            f"(score {d['lpp']['score']}, fully connected layers included)."
        )
    return "\n".join(rows)


def md_published() -> str:
    rows = ["| attack | published (ResNet-18, CIFAR-10, 10 % poisoning; ACC / ASR, before → after) |", "|---|---|"]
    rows += [f"| {k} | {v} |" for k, v in PUBLISHED.items()]
    return "\n".join(rows)


def md_sweeps(cache: dict[str, Any]) -> str:
    parts = []
    for folder in SWEEP_MODELS:
        s = cache.get(folder, {}).get("sweep")
        if not s:
            continue
        parts.append(f"**{folder}** ({s['clp']['n_samples']} test images, {s['clp']['n_attacked']} attacked)\n")
        parts.append(f"![sweep {folder}](img/sweep-{folder}.png)\n")
        head = "| u | " + " | ".join(f"{m.upper()} ACC / ASR (pruned %)" for m in ("clp", "lpp")) + " |"
        rows = [
            head,
            "|---|---|---|",
            f"| before | {pct(s['clp']['baseline_acc'])} / {pct(s['clp']['baseline_asr'])} | |",
        ]
        for pc, pl in zip(s["clp"]["points"], s["lpp"]["points"], strict=True):
            cells = [f"{pct(p['acc'])} / {pct(p['asr'])} ({100 * p['pruned_fraction']:.1f})" for p in (pc, pl)]
            rows.append(f"| {pc['settings']['u']:g} | {cells[0]} | {cells[1]} |")
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def md_tac(cache: dict[str, Any]) -> str:
    parts = []
    for folder in TAC_MODELS:
        t = cache.get(folder, {}).get("tac")
        if not t:
            continue
        for method in ("clp", "lpp"):
            r = t[method]
            s = r["summary"]
            parts.append(
                f"**{folder}, {method.upper()}** (u = {r['params']['u']:g}, score {r['params']['score']}; TAC on "
                f"{r['n_images']} triggered test images): the highest-TAC channel of a layer is pruned in "
                f"{s['layers_top_tac_pruned']} of {s['layers']} layers; {s['strongest_pruned']} of the "
                f"{len(s['strongest'])} channels whose TAC stands out most (TAC / layer median) are pruned; median "
                f"Spearman rho(TAC, score) over layers {s['median_rho']:.2f}.\n"
            )
            if method == "clp":
                rows = [
                    "| layer | channel | TAC / layer median | score z (threshold z = u) | pruned |",
                    "|---|---|---|---|---|",
                ]
                for x in s["strongest"]:
                    rows.append(
                        f"| {x['node']} | {x['channel']} | {x['tac_over_median']:.1f} | {x['score_z']:+.2f} | "
                        f"{'yes' if x['pruned'] else 'no'} |"
                    )
                parts.append("\n".join(rows) + "\n")
                parts.append(f"![TAC vs score {folder}](img/tac-{folder}.png)\n")
    return "\n".join(parts)


def md_ablate(cache: dict[str, Any]) -> str:
    rows = [
        "| model | method | pruned alone: layer, channel (score z): ACC / ASR | all of them |",
        "|---|---|---|---|",
    ]
    for folder, arch, attack in MODELS:
        a = cache.get(folder, {}).get("ablate")
        if not a:
            continue
        rows.append(f"| {arch} {attack} | before | | {pair(a['before'])} |")
        for method in ("clp", "lpp"):
            r = a[method]
            cells = "<br>".join(
                f"`{c['node']}` {c['channel']} (z {c['score_z']:+.2f}): {pair(c)}" for c in r["channels"]
            )
            rows.append(f"| | {method.upper()} | {cells or 'nothing pruned'} | {pair(r['together'])} |")
    n = next((cache[f]["ablate"]["before"]["n"] for f, _, _ in MODELS if cache.get(f, {}).get("ablate")), 0)
    return "\n".join(rows) + f"\n\n({n} test images per model, outside the calibration set.)"


def md_defaults(cache: dict[str, Any]) -> str:
    present = [f for f in DEFAULTS_MODELS if cache.get(f, {}).get("defaults")]
    if not present:
        return "(not run yet)"
    head = "| u | u_low | b | k | " + " | ".join(f"{f} ACC / ASR" for f in present) + " | mean ACC drop | mean ASR |"
    rows = [head, "|" + "---|" * (6 + len(present))]
    base = " | ".join(
        f"{pct(cache[f]['defaults']['baseline_acc'])} / {pct(cache[f]['defaults']['baseline_asr'])}" for f in present
    )
    rows.append(f"| before | | | | {base} | | |")
    points = [cache[f]["defaults"]["points"] for f in present]
    for i, p0 in enumerate(points[0]):
        s = p0["settings"]
        cells = [f"{pct(pts[i]['acc'])} / {pct(pts[i]['asr'])}" for pts in points]
        drop = np.mean(
            [cache[f]["defaults"]["baseline_acc"] - pts[i]["acc"] for f, pts in zip(present, points, strict=True)]
        )
        asr = np.mean([pts[i]["asr"] for pts in points])
        u_low = "off" if s["u_low"] <= -50 else f"{s['u_low']:g}"
        rows.append(
            f"| {s['u']:g} | {u_low} | {s['bias_rate']:g} | {s['topk']} | {' | '.join(cells)} | "
            f"{100 * drop:.2f} | {100 * asr:.2f} |"
        )
    n = cache[present[0]]["defaults"]["n_samples"]
    return "\n".join(rows) + f"\n\n({n} test images per model, outside the calibration set.)"


def replace_block(path: Path, name: str, body: str, template: str) -> None:
    text = path.read_text() if path.exists() else template
    begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
    if begin not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text)
    path.write_text(text)


def write_docs(cache: dict[str, Any]) -> None:
    DOCS.mkdir(exist_ok=True)
    res = DOCS / "results.md"
    for name, body in (
        ("table", md_table(cache)),
        ("details", md_details(cache)),
        ("published", md_published()),
        ("sweeps", md_sweeps(cache)),
        ("tac", md_tac(cache)),
        ("ablate", md_ablate(cache)),
        ("machine", f"{platform.machine()}, Python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d')}"),
    ):
        replace_block(res, name, body, "# Results\n")
    n = next((cache[f]["table"]["before"]["n"] for f, _, _ in MODELS if cache.get(f, {}).get("table")), 0)
    headline = (
        f"ACC / ASR (%) on {n:,} CIFAR-10 test images; models trained on 2 CPU cores by "
        "`examples/train_backdoored.py` (10 % poisoning, all-to-one, target 0); CLP and LPP with their defaults, "
        "data-free; calibrated: u chosen on 500 other clean test images, budget 1 point. Published: after-defense "
        "figures of the CLP paper [C] and the LPP paper [L] for ResNet-18 trained on a GPU "
        "([details](docs/results.md)).\n\n" + md_table(cache, headline=True) + "\n\nReproduce: "
        "`bash examples/build_zoo.sh && python bench/reproduce.py`.\n"
    )
    (DOCS / "results-headline.md").write_text(headline)
    if README.exists() and "<!-- BEGIN generated: headline -->" in README.read_text():
        replace_block(README, "headline", headline, "")
    replace_block(DOCS / "lpp-defaults.md", "grid", md_defaults(cache), "# LPP defaults\n")


# --------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", default="defaults,table,sweep,tac,ablate", help="comma-separated: " + ", ".join(STEPS))
    ap.add_argument("--only", default=None, help="comma-separated zoo folders (default: all present)")
    ap.add_argument("--eval-limit", type=int, default=None, help="seeded subset of the 9,500 evaluation images")
    ap.add_argument("--sweep-limit", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=None, help="raw results (default ZOO/reproduce-cache.json)")
    ap.add_argument("--docs-only", action="store_true", help="rewrite the docs from the cache, run nothing")
    args = ap.parse_args(argv)
    cache_path = args.cache or args.zoo / "reproduce-cache.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if not args.docs_only:
        with np.load(args.data) as npz:
            n_test = len(npz["y_test"])
        idx = splits(n_test, args.eval_limit, args.sweep_limit)
        only = set(args.only.split(",")) if args.only else None
        for step in [s.strip() for s in args.steps.split(",") if s.strip()]:
            for folder, _, _ in MODELS:
                if (only and folder not in only) or (step in STEP_MODELS and folder not in STEP_MODELS[step]):
                    continue
                path = args.zoo / folder
                if not (path / "model.onnx").is_file() or not (path / "train.json").is_file():
                    print(f"{folder}: not in {args.zoo}, skipped", flush=True)
                    continue
                t0 = time.perf_counter()
                entry = cache.setdefault(folder, {})
                entry["train"] = {
                    k: v for k, v in json.loads((path / "train.json").read_text()).items() if k != "history"
                }
                entry[step] = STEPS[step](folder, path, args.data, idx)
                cache_path.write_text(json.dumps(cache, indent=1) + "\n")
                print(f"{folder}: {step} done in {time.perf_counter() - t0:.0f} s", flush=True)
    write_docs(cache)
    print(f"wrote {DOCS / 'results.md'}, {DOCS / 'results-headline.md'}, {DOCS / 'lpp-defaults.md'}")


if __name__ == "__main__":
    main()
