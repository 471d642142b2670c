"""Every method x zoo model with a few clean images: ACC / ASR on held-out test images, the guard's validation
accuracy, and the time (issue 18's results; writes docs/results-repair.md and docs/results-repair.json).

Data (CIFAR-10 test split, seeded permutation ``perm`` of its 10,000 images): the clean images a user holds are
``perm[:n]`` (n = 500 or 2,500 by ``--clean-n``); ACC / ASR are measured on ``perm[5000:5000 + --eval-n]``,
images no method sees. Each method runs at its defaults through ``onnxclp.api.sanitize_file`` with the model's
normalisation from attack.json and the accuracy guard's defaults (40 % of the clean images held out to test the
candidates in sequence and check the result, budget 3 points; a row records its ``split``); a refusal (the guard's exit 5, BNP on a BN-folded graph...) is a row with its reason. BNP and bnp-ac read the
BN-kept export (model.bn.onnx), every other method the TorchScript export with BatchNorm folded (model.onnx).

Results accumulate in the JSON (``--json``; a (model, method, n) already there is skipped unless ``--force``), so
the bench can run in pieces while models train: ``nice -n 5 python bench/repair_zoo.py --methods ft fst``.
The markdown is regenerated from the whole JSON each run, with the hand-written notes of
``docs/results-repair-notes.md`` under the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = [
    "ft",
    "fst",
    "fst-head",
    "ft-sam",
    "i-bau",
    "sau",
    "nc-unlearn",
    "npd",
    "clp-npd",
    "clp-npd-fst",
    "ac",
    "bnp-ac",
    "clp-ac",
    "sau-ac",
    "fst-gate",
    "fst-sau-gate",
    "anp",
    "rnp",
    "bnp",
    "clp",
    "lpp",
    "lpp-gate",
    "otbr",
]


def own_draw(cifar: Path, folder: Path, n_clean: int, model: str, seed: int = 0) -> Path:
    """``--draw per-model``: the model's own ``n_clean`` images from the 5,000 the test images are not drawn from
    (seeded by the model's name), as separate users would each have their own."""
    import zlib

    import numpy as np

    with np.load(cifar, allow_pickle=False) as d:
        x, y = d["x_test"], d["y_test"]
    pool = np.random.default_rng(seed).permutation(len(y))[:5000]
    clean = np.random.default_rng(zlib.crc32(model.encode())).choice(pool, n_clean, replace=False)
    path = folder / f"clean{n_clean}-{model}.npz"
    np.savez(path, x_test=x[clean], y_test=y[clean])
    return path


def subsets(cifar: Path, folder: Path, n_clean: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    import numpy as np

    with np.load(cifar, allow_pickle=False) as d:
        x, y = d["x_test"], d["y_test"]
    perm = np.random.default_rng(seed).permutation(len(y))
    clean, ev = perm[:n_clean], perm[5000 : 5000 + n_eval]
    cp, ep = folder / f"clean{n_clean}.npz", folder / f"eval{n_eval}.npz"
    np.savez(cp, x_test=x[clean], y_test=y[clean])
    np.savez(ep, x_test=x[ev], y_test=y[ev])
    return cp, ep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=ROOT / "zoo")
    ap.add_argument("--cifar", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10.npz")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--models", nargs="*", default=None, help="zoo folder names (default: every backdoored one)")
    ap.add_argument("--clean-n", nargs="+", default=["500"],
                    help="clean images per run: a number, 0 (data-free: no images, no guard) or synthetic:N "
                    "(--clean-data synthetic:N, images made from the model)")  # fmt: skip
    ap.add_argument("--eval-n", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "results-repair.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results-repair.md")
    ap.add_argument("--force", action="store_true", help="re-measure entries already in the JSON")
    ap.add_argument("--draw", choices=("shared", "per-model"), default="shared",
                    help="clean images: one draw for every model (default) or each model its own")  # fmt: skip
    ap.add_argument("--val-fraction", type=float, default=None, help="the guard's --val-fraction (default 0.4)")
    ap.add_argument("--select-fraction", type=float, default=None, help="the guard's --select-fraction")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a method parameter for every method run (e.g. distill_mix=1); the rows record it",
    )
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item}: expected NAME=VALUE")
        overrides[key.replace("-", "_")] = float(value) if value.replace(".", "", 1).isdigit() else value
    import torch

    from onnxclp.api import sanitize_file
    from onnxclp.errors import EXIT_REFUSED, OnnxclpError
    from onnxclp.eval.api import evaluate
    from onnxclp.guard import BLIND_NOTE

    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
    split = split_name(args.select_fraction)
    done = {key_of(r) for r in results["runs"]}
    models = sorted(p.parent for p in args.zoo.glob("*/model.onnx") if (p.parent / "attack.json").is_file())
    models = [m for m in models if "clean" not in m.name]
    if args.models:
        models = [m for m in models if m.name in args.models]
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.clean_n:
            n: int | str = spec if str(spec).startswith("synthetic") else int(spec)
            clean, ev = subsets(args.cifar, Path(tmp), n if isinstance(n, int) and n > 0 else 500, args.eval_n)

            def measure(path: Path, cfg: Path, ev: Path = ev) -> tuple[float, float]:
                r = evaluate(path, ev, attack_config=cfg, threads=args.threads)
                return 100 * r.metrics.acc, 100 * r.metrics.asr

            for folder in models:
                if args.draw == "per-model" and isinstance(n, int) and n > 0:
                    clean = own_draw(args.cifar, Path(tmp), n, folder.name)
                cfg = folder / "attack.json"
                norm = json.loads(cfg.read_text()).get("normalize") or {}
                base = next((r for r in results["runs"] if r["model"] == folder.name and r["method"] == "none"), None)
                if base is None:
                    acc, asr = measure(folder / "model.onnx", cfg)
                    train = json.loads((folder / "train.json").read_text()) if (folder / "train.json").is_file() else {}
                    base = {"model": folder.name, "method": "none", "clean_n": 0, "acc": acc, "asr": asr,
                            "epochs": train.get("epochs")}  # fmt: skip
                    results["runs"].append(base)
                    print(folder.name, "input", f"{acc:.2f} / {asr:.2f}", flush=True)
                for method in args.methods:
                    key = key_of({"model": folder.name, "method": method, "clean_n": n, "split": split})
                    if key in done and not args.force:
                        continue
                    src = folder / ("model.bn.onnx" if method in ("bnp", "bnp-ac") else "model.onnx")
                    out = Path(tmp) / f"{folder.name}-{method}.onnx"
                    ctx = {"clean_data": clean, "clean_n": n, "mean": norm.get("mean"), "std": norm.get("std"),
                           "quiet": True, "val_fraction": args.val_fraction,
                           "select_fraction": args.select_fraction}  # fmt: skip
                    if n == 0:  # data-free: nothing but the ONNX file (and the normalisation)
                        ctx = {k: v for k, v in ctx.items() if k not in ("clean_data", "clean_n")}
                    elif isinstance(n, str):  # each model's set made once, read back by every repair
                        ctx["clean_data"], synth_seconds = synthesized(src, n, Path(tmp), norm, args.val_fraction)
                        ctx["clean_n"] = 500  # not read: a saved set is read whole
                    row = {"model": folder.name, "method": method, "clean_n": n}
                    if isinstance(n, int) and n > 0:
                        row["split"] = split
                    if args.draw == "per-model":
                        row["draw"] = "per-model"
                    if isinstance(n, str):
                        row["synth_seconds"] = synth_seconds
                    if overrides:
                        row["set"] = overrides
                    t0 = time.perf_counter()
                    try:  # forced, so that a result the guard refuses is measured too (the row says refused)
                        rep = sanitize_file(
                            src, out, method, context=ctx, force=True, **overrides
                        )  # defaults: not risky
                    except OnnxclpError as exc:
                        row.update(refused=exc.message, exit=exc.exit_code, seconds=time.perf_counter() - t0)
                    else:
                        row["seconds"] = time.perf_counter() - t0
                        acc, asr = measure(out, cfg)
                        g = rep.guard or {}
                        row.update(val_before=g.get("acc_before"), val_after=g.get("acc_after"),
                                   pruned=rep.totals()["pruned_channels"], rewritten=len(rep.rewritten),
                                   added=len(rep.added_nodes), n_select=g.get("n_select"),
                                   selected_on_validation=g.get("selected_on_validation"))  # fmt: skip
                        if g.get("drop") is not None:  # the guard's final check (onnxclp.guard.decide)
                            row["guard"] = {k: g.get(k) for k in ("drop", "se", "bound", "confidence", "n_val",
                                                                  "changed_predictions", "accepted")}  # fmt: skip
                        tr = rep.training or {}
                        if tr.get("lr_ladder"):  # the learning rate the walk kept (docs/algorithms.md)
                            row.update(lr=tr["settings"]["lr"], chosen_epoch=tr.get("chosen_epoch"))
                        for walked in ("weight_ladder", "alpha_ladder", "fst_alpha_ladder"):  # AC's, fst-head's
                            if tr.get(walked):  # each run's strength and whether its end passed, in walk order
                                row[walked] = [{k: e.get(k) for k in ("weight", "alpha", "whole_run_within",
                                                                       "within", "drop") if k in e}
                                               for e in tr[walked]]  # fmt: skip
                        if tr.get("gate"):  # fst-gate: the suspects kept and the walk over them
                            gate = tr["gate"]
                            row["gate"] = {"suspects": gate["suspects"], "confidence": gate["confidence"],
                                           "copies": gate.get("copies", 1),
                                           "walk": [[s.get("copies", 1), s["suspects"], s["confidence"],
                                                     s["within"], None if s["drop"] is None else round(s["drop"], 2)]
                                                    + ([s["sure_suspects"], s.get("joint_suspects", 0),
                                                        s.get("joint_confidence", 0.0)]
                                                       if s.get("sure_suspects") or s.get("joint_suspects") else [])
                                                    for s in gate["ladder"]]}  # fmt: skip
                            for kept in ("sure_suspects", "joint_suspects", "joint_confidence"):  # session 17
                                if gate.get(kept):  # the sure and joint moves kept (fst-sau-gate)
                                    row["gate"][kept] = gate[kept]
                            for c in gate.get("further_copies", []):  # SAU's per-class count of its unlearnt
                                row["gate"]["adversarial_classes"] = c["settings"].get("unlearned_per_class")
                        if g.get("tuned"):  # the strength the guard chose on the fit images (passes/tune.py)
                            row["tuned"] = g["tuned"]["parameters"]
                        if g and g.get("accepted") is False:  # what a user gets: nothing written (exit 5)
                            blind = [n for n in g.get("notes", []) if n.startswith(BLIND_NOTE)]
                            why = (f"guard: {blind[0][len(BLIND_NOTE):]}" if blind else  # the check could not see
                                   f"guard: drop {g['drop']:.1f} pt, {100 * g['confidence']:.0f}% bound "
                                   f"{g['bound']:.1f} pt on {g['n_val']} images")  # fmt: skip
                            row.update(refused=why, exit=EXIT_REFUSED, forced_acc=acc, forced_asr=asr)
                        else:
                            row["acc"], row["asr"] = acc, asr
                    print(json.dumps(row), flush=True)
                    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
                    results = store_row(args.json, row, machine)
                    write_markdown(results, args.out, args.json)
    write_markdown(results, args.out, args.json)


def split_name(select_fraction: float | None) -> str:
    """How a row's clean images were split: ``sequence`` (the default since session 14: no selection part, the
    validation part tests the candidates in sequence) or ``select`` (``--select-fraction``: sessions 6-13)."""
    return "select" if select_fraction else "sequence"


def key_of(r: dict) -> tuple:
    """A row's identity: model, method, clean images and split (rows with clean images and no ``split`` are from
    sessions 13 and before: ``select``)."""
    n = r["clean_n"]
    return (r["model"], r["method"], n, r.get("split", "select") if isinstance(n, int) and n > 0 else "")


def store_row(path: Path, row: dict, machine: str) -> dict:
    """Replace ``row``'s (model, method, clean_n) entry of the results JSON at ``path`` and return the results:
    read, changed and written under an exclusive lock, so that two benches writing the same file keep each
    other's rows (the file is re-read, not the copy this process loaded at its start)."""
    import fcntl

    with open(path.with_name("." + path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        key = key_of(row)
        results["runs"] = [r for r in results["runs"] if key_of(r) != key]
        results["runs"].append(row)
        results["machine"] = machine
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)
    return results


_SYNTHESIZED: dict[tuple[Path, str], tuple[Path, float]] = {}


def synthesized(src: Path, spec: str, tmp: Path, norm: dict, val_fraction: float | None) -> tuple[Path, float]:
    """``--clean-data synthetic:N`` made once per model file (the BN-kept export matches BatchNorm statistics,
    so it gets its own set) and saved (onnxclp.defences.synth.save); every repair reads the saved set back with
    its own split (onnxclp.passes.guard.load_saved_synthetic), the set the CLI would have made for it. Returns
    the .npz and the seconds the synthesis took."""
    key = (src, spec)
    if key not in _SYNTHESIZED:
        from onnxclp.bridge import load
        from onnxclp.defences.synth import SynthSettings, parse_spec, save, synthesize_split
        from onnxclp.guard import SYNTHETIC_VAL_FRACTION, split_indices

        n, overrides = parse_spec(spec)
        fit, val = split_indices(n, val_fraction or SYNTHETIC_VAL_FRACTION)
        settings = SynthSettings(n=len(fit), **overrides)
        syn = synthesize_split(load(src, logits=True), (3, 32, 32), settings, len(val), mean=norm.get("mean"),
                               std=norm.get("std"))  # fmt: skip
        folder = tmp / f"synthetic-{src.parent.name}-{src.stem}"
        save(syn, folder)
        _SYNTHESIZED[key] = (folder / "synthetic.npz", float(syn.info["seconds"]))
        print(src.parent.name, src.name, f"synthesized {n} images in {syn.info['seconds']:.0f} s", flush=True)
    return _SYNTHESIZED[key]


def _secs(s: float) -> str:
    return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


def write_markdown(results: dict, out: Path, source: Path | None = None) -> None:
    """docs/results-repair.md from the JSON: per clean-set size, a table of models x methods and the averages."""
    runs = results["runs"]
    base = {r["model"]: r for r in runs if r["method"] == "none"}
    order = {"sequence": 0, "select": 1, "": 0}
    sizes = sorted(
        {key_of(r)[2:] for r in runs if r["method"] != "none"},
        key=lambda k: (isinstance(k[0], str), str(k[0]).zfill(9), order[k[1]]),
    )
    parts = []
    for n, split in sizes:
        rows = [r for r in runs if key_of(r)[2:] == (n, split)]
        methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
        models = sorted({r["model"] for r in rows})
        head = "| model | input ACC / ASR | " + " | ".join(methods) + " |"
        lines = [head, "|---|---|" + "---|" * len(methods)]
        for model in models:
            b = base.get(model, {})
            cells = [model, f"{b.get('acc', float('nan')):.1f} / {b.get('asr', float('nan')):.1f}"]
            for m in methods:
                r = next((r for r in rows if r["model"] == model and r["method"] == m), None)
                if r is None:
                    cells.append("")
                elif "refused" in r and "forced_acc" in r:  # the guard refused: measured anyway, in brackets
                    cells.append(f"refused [{r['forced_acc']:.1f} / {r['forced_asr']:.1f}] ({_secs(r['seconds'])} s)")
                elif "refused" in r:
                    cells.append(f"refused (exit {r['exit']}, {_secs(r['seconds'])} s)")
                else:
                    cells.append(f"{r['acc']:.1f} / {r['asr']:.1f} ({_secs(r['seconds'])} s)")
                if r is not None and r.get("synth_seconds") is not None:  # the synthesis, once per model file
                    cells[-1] = cells[-1][:-1] + f" + {_secs(r['synth_seconds'])} s synthesis)"
            lines.append("| " + " | ".join(cells) + " |")
        # a refused result leaves the user with the input model: it counts with the input's ACC / ASR
        avg = ["| average ACC drop / ASR (refused = the input kept) | |"]
        for m in methods:
            got = [r for r in rows if r["method"] == m and r["model"] in base]
            if not got:
                avg.append(" |")
                continue
            accs = [r.get("acc", base[r["model"]]["acc"]) for r in got]
            asrs = [r.get("asr", base[r["model"]]["asr"]) for r in got]
            drop = sum(base[r["model"]]["acc"] - a for r, a in zip(got, accs, strict=True)) / len(got)
            refused = sum(1 for r in got if "refused" in r)
            avg.append(f" {drop:.1f} pt / {sum(asrs) / len(asrs):.1f} % (max {max(asrs):.1f} %; {len(got)} models, "
                       f"{refused} refused) |")  # fmt: skip
        lines.append("".join(avg))
        title = (
            "Data-free (no images)"
            if n == 0
            else f"Data-free: {n.split(':')[-1]} images synthesized from the model (`--clean-data {n}`)"
            if isinstance(n, str)
            else f"{n} clean images"
            if split == "sequence"
            else f"{n} clean images, the sessions 6-13 split (a selection part chose, the validation part only checked)"
        )
        parts.append(f"## {title}\n\n" + "\n".join(lines))
    hand = out.with_name(out.stem + "-notes.md")  # notes written by hand, kept beside the generated doc
    notes = hand.read_text().strip() if hand.is_file() else ""
    name = (source or Path("docs/results-repair.json")).name
    per_model = any(r.get("draw") == "per-model" for r in runs)
    draw = (
        "Each model got its own clean images (`--draw per-model`: drawn, seeded by the model's name, from the 5,000 "
        "CIFAR-10 test images the evaluation images are not drawn from), as separate users would have them; the "
        "notes on these rows are in results-repair-notes.md.\n\n"
        if per_model
        else ""
    )
    text = f"""# Repairs on the zoo with a few clean images

{draw}Generated by `bench/repair_zoo.py` from `docs/{name}` ({results.get("machine", "")}; the 2-core
machine; the session-8 rows, those with `guard` in the JSON, ran with it otherwise idle, older rows beside zoo training and other work, so
their times are wall seconds under that load). Cells:
ACC / ASR (%) on 3,000 CIFAR-10 test images no method saw (attack applied by `onnxclp evaluate`), and the time of
`sanitize_file` (load to save, the guard's measurements included). Every method at its defaults with the guard's
defaults, budget 3 points. The default split since session 14 (the tables titled "N clean images"; `split`
`sequence` in the JSON): 40 % of the clean images held out for validation, where the method's candidates (a
run's end per learning rate or weight, CLP/LPP/BNP's u, ANP's count) are tested in a fixed sequence, weakest
first, up to the first over budget (docs/algorithms.md, "Testing candidates in sequence"); the method trains on
the other 60 %. The tables titled "the sessions 6-13 split": 20 % held out for validation, which only checks;
the candidates chosen on a further 20 %, the selection part (rows with `n_select` in the JSON; older rows chose
them on the validation images); the method trained on the remaining 60 %. CLP, LPP, BNP and clp-npd's pruning
tune u on the fit part (the `tuned` values in the JSON). A refused result is not written, which is what a user
gets, and the averages count it as the input kept. Rows from session 8 on ran forced and apply the guard's
verdict afterwards (a result is refused unless the drop's one-sided 90 % upper bound on the validation images is
within budget; earlier rows used the measured drop): `refused [ACC / ASR]` is what the refused result measured. BNP and bnp-ac read the BN-kept export, the others the BN-folded one.
Data-free rows: nothing but the ONNX file and the normalisation (no guard), or images synthesized from the model
(`--clean-data synthetic:N`: the guard then checks agreement with the input model, not accuracy).

<!-- BEGIN generated -->
{(chr(10) * 2).join(parts)}
<!-- END generated -->

{notes}
"""
    out.write_text(text)


if __name__ == "__main__":
    main()
