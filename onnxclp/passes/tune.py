"""The guard's tuning of a score-based method's strength (CLP's and LPP's ``u``; LPP's ``u_low``, ``bias_rate``).

The papers fix the threshold because they assume no data (CLP, Zheng et al., ECCV 2022, section 5.1: u = 3 on
CIFAR-10). Given clean images (``--clean-data``), the user can afford to measure, and a threshold chosen for
another dataset is a guess: this pass chooses it on the **method's part** of the clean images (the fit part of
:mod:`onnxclp.passes.guard`), so the guard's final check on the validation part stays independent of the choice.

The rule, written down before any zoo measurement (docs/algorithms.md, "The accuracy guard"):

1. Only the parameters the user did not set are tuned (``Params.given``); ``context['tune'] = False`` turns the
   pass off. ``u`` walks the candidates (``context['u_grid']``, default 8 down to 0.5 in steps of 0.25) from the
   largest (least pruning) down; every other parameter with a ``calibration`` list starts at its least invasive
   value for that walk.
2. Each candidate is applied to a copy of the model (find, score, decide, streams, prune: the pipeline's own
   passes), the copy classifies the fit images with onnxruntime, and its paired drop against the input model on
   the same images is measured (:func:`onnxclp.guard.paired_drop`). The walk keeps the strongest candidate within
   the budget and stops at the first one over it (:func:`onnxclp.guard.choose_strongest`).
3. With that ``u``, each calibrated parameter walks its list towards the more invasive values the same way.
4. When even the least invasive candidate is over budget, the method's defaults are kept and the guard's check
   decides (it will usually refuse).
5. The choice sits at the edge of the budget on the fit images, so independent images find it over budget about
   half the time (measured: BNP on resnet-blended, 4 points on 100 validation images). By default (no selection
   part) the candidates within budget on the fit images are tested on the validation part in sequence, weakest
   first up to the choice, and the strongest accepted before the first failure is kept (docs/algorithms.md,
   "Testing candidates in sequence"), except for a first stage (``tune_share`` < 1: clp-ac, bnp-ac, clp-npd,
   clp-npd-fst), whose choice stays the fit images' (there held to the drop's one-sided bound at the guard's
   confidence, not the measured drop): the second stage's candidates, tested against the input model, include
   it, and a test of its own would make their sequence depend on its outcome. With ``--select-fraction``
   the choice is measured
   on the guard's selection part here (:func:`onnxclp.guard.split_parts`; the validation part when the images are
   too few for three parts); when it is over budget there, the walk steps back through the weaker candidates
   (those within budget on the fit images, strongest first) and keeps the first within budget on the selection
   part too; when none is, the weakest (the guard's check then usually refuses it). The validation part is read
   only by the guard's final check.

What was tried, and why the choice, goes into the guard's entry of the report (``tuned``) and on stderr.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxclp.guard import SELECT_Z, choose_strongest, paired_drop
from onnxclp.pipeline import PassResult, State

DEFAULT_U_GRID = tuple(float(u) for u in np.arange(8.0, 0.49, -0.25))


def tunable(state: State) -> list[str]:
    """The parameters this pass would tune: ``u`` and those with a ``calibration`` list, not set by the user."""
    if not state.options.context.get("tune", True):
        return []
    names = [p.name for p in state.method.params if p.name == "u" or p.calibration is not None]
    return [n for n in names if n not in state.params.given]


def _apply(state: State, snapshot: bytes, values: dict[str, Any]) -> State:
    """A copy of the model with the method applied at ``values`` (the pipeline's own passes, no guard)."""
    from onnxclp.passes import exclude, find, prune, rewrite, score, streams
    from onnxclp.tensors import TensorStore

    model = onnx.ModelProto()
    model.ParseFromString(snapshot)
    base = Path(state.path).parent if state.path else Path(".")
    params = replace(state.params, values={**state.params.values, **values})
    options = replace(state.options, fuse_bn=False, inline_functions=False)  # done to the snapshot already
    copy = State(model, TensorStore(model, base), state.method, params, options, state.path)
    copy.clean = state.clean  # a method that reads the clean images (BNP) reads the same split
    for p in (find.run, exclude.run, score.run):
        p(copy)
    state.method.decide_for_tuning(copy)
    # rewrite: a method whose decisions shape an added graph (lpp-gate's gated copy) is measured as it is written
    for p in (streams.run, prune.run, rewrite.run):
        p(copy)
    return copy


def run(state: State) -> PassResult:
    """Pipeline pass: tune the method's strength on the fit part (see the module docstring)."""
    if state.guard is None or not state.options.edit or state.clean is None:
        return PassResult()
    names = tunable(state)
    if not names:
        return PassResult()
    from onnxclp.passes.guard import model_bytes, predict

    clean = state.clean
    ctx = state.options.context
    device = str(ctx.get("device") or "auto")
    x_fit, y_fit = clean.x_fit, clean.y_fit.numpy()
    snapshot = model_bytes(state.model, state.store)
    right_input = predict(state.model, state.store, x_fit, device) == y_fit
    # a pruning stage before a repair (onnxclp.methods.clp_npd) takes a share of the budget, the repair the rest
    share = float(getattr(state.method, "tune_share", 1.0))
    budget = float(state.guard.budget) * share
    specs = {p.name: p for p in state.method.params}
    values = dict(state.params.values)
    calibrated = [n for n in names if n != "u"]
    for n in calibrated:
        values[n] = specs[n].calibration[0]  # type: ignore[index]  # least invasive while u walks
    tried: list[dict[str, Any]] = []
    # a first stage, tested in sequence (no selection part), is not tested on the validation part (below): its
    # choice on the fit images must then stand on its own, so it is held to the guard's bound there too
    sequence_z = clean.sequence_z(state.guard)  # no selection part: the validation part tests the path in sequence
    first_stage = share < 1.0 and sequence_z is not None

    seen: dict[tuple, dict[str, np.ndarray]] = {}  # the same decisions give the same model: measured once
    x_sel, y_sel = clean.x_sel, clean.y_sel.numpy()  # the step back reads the selection part

    def predictions(trial: dict[str, Any], part: str) -> tuple[np.ndarray, int]:
        copy = _apply(state, snapshot, trial)
        key = tuple(
            (d.scored.layer.key, tuple(d.selection.prune), tuple(d.selection.rescale), repr(d.topk))
            for d in copy.decisions
        )
        got = seen.setdefault(key, {})
        if part not in got:
            x, y = (x_fit, y_fit) if part == "fit" else (x_sel, y_sel)
            got[part] = predict(copy.model, copy.store, x, device) == y
        return got[part], sum(len(d.selection.prune) for d in copy.decisions)

    path: list[dict[str, Any]] = []  # every candidate within budget on the fit images, weakest first

    def measure(trial: dict[str, Any]) -> np.ndarray:
        right, pruned = predictions(trial, "fit")
        tried.append({**{k: trial[k] for k in names if k in trial}, "pruned": pruned})
        return right

    def walk(trials: list[dict[str, Any]]) -> tuple[int | None, list[dict[str, Any]]]:
        i, steps = choose_strongest(trials, measure, right_input, budget, sequence_z if first_stage else 0.0)
        for t, step in zip(tried[-len(steps) :], steps, strict=True):
            t.update(acc=step["acc"], drop=step["drop"], within=step["within"])
        path.extend(step["candidate"] for step in steps if step["within"])
        return i, steps

    why: list[str] = []
    if "u" in names:
        grid = [float(u) for u in ctx.get("u_grid") or DEFAULT_U_GRID]
        grid = sorted({u for u in grid if "u_low" not in values or u > values["u_low"]}, reverse=True)
        trials = [{**values, "u": u} for u in grid]
        i, steps = walk(trials)
        if i is None:
            state.guard.notes.append(
                f"tuning: even u={grid[0]:g} loses {steps[0]['drop']:.1f} points on the {len(y_fit)} fit images "
                f"(budget {budget:g}): the defaults are kept"
            )
            values = dict(state.params.values)
            calibrated = []
        else:
            values["u"] = grid[i]
            why.append(f"u={grid[i]:g} (drop {steps[i]['drop']:.1f} pt)")
    for n in calibrated:
        options = list(specs[n].calibration or ())
        trials = [{**values, n: v} for v in options]
        if "u_low" in values:
            trials = [t for t in trials if t["u_low"] < t["u"]]
        i, steps = walk(trials)
        if i is not None:
            values[n] = trials[i][n]
            why.append(f"{n}={values[n]:g} (drop {steps[i]['drop']:.1f} pt)")
    checker = f"the {clean.selection_name} part checks it"
    line = f"tuned on the {len(y_fit)} fit images (strongest within {budget:g} pt; {checker}): " + (
        ", ".join(why) if why else "defaults kept"
    )
    # the selection part's check of the choice: over budget, step back to weaker candidates (those within budget on
    # the fit images, strongest first) until one is within on the selection part too
    back: list[dict[str, Any]] = []
    right_sel = clean.right_before_selection
    sequential = sequence_z is not None
    z = SELECT_Z if sequence_z is None else sequence_z
    if why and right_sel is not None and first_stage:
        # a first stage (a second stage trains on it): its choice stays the fit images'. Testing it on the
        # validation part first would make the second stage's sequence depend on that test's outcome (a branch),
        # and the one-sequence guarantee would no longer hold (docs/algorithms.md, "Testing candidates in
        # sequence"); the second stage's candidates, tested against the input at the whole budget, cover it
        line += (
            "; a first stage: chosen by the bound on the fit images, and the validation images test the second "
            "stage's candidates, which include it"
        )
    elif why and right_sel is not None:
        start = next((i for i in range(len(path) - 1, -1, -1) if path[i] == values), len(path) - 1)
        # with a selection part: strongest first, back to the first within; in sequence: weakest first, up to the
        # last within before the first over (docs/algorithms.md, "Testing candidates in sequence")
        order = path[: start + 1] if sequential else list(reversed(path[: start + 1]))
        passed: dict[str, Any] | None = None
        for trial in order:
            right, _ = predictions(trial, "sel")
            d = paired_drop(right_sel, right)
            within = d.bound(z) <= budget + 1e-9  # the one-sided 90 % bound
            back.append({**{k: trial[k] for k in names}, "drop": d.drop, "bound": d.bound(z), "within": within,
                         "part": clean.selection_name, "in_sequence": sequential})  # fmt: skip
            if within:
                passed = dict(trial)
                if not sequential:
                    break
            elif sequential:
                break
        values = passed if passed is not None else (dict(path[0]) if path else values)
        if sequential and back:
            clean.mark_selection(state.guard, sequence=True)
            ok = sum(b["within"] for b in back)
            line += (
                f"; tested in sequence on the validation images, weakest first: {ok} of {len(back)} within budget, "
                + ("kept " + ", ".join(f"{k}={values[k]:g}" for k in names) if passed else "none (the weakest kept)")
            )
        elif len(back) > 1:
            clean.mark_selection(state.guard)
            line += (
                f"; over budget on the {clean.selection_name} images ({back[0]['drop']:.1f} pt), stepped back to "
                + ", ".join(f"{k}={values[k]:g}" for k in names)
                + (f" ({back[-1]['drop']:.1f} pt)" if back[-1]["within"] else " (the weakest; still over)")
            )
    chosen = {n: values[n] for n in names}
    state.params = replace(state.params, values=values)
    state.guard.tuned = {"parameters": chosen, "on": f"{len(y_fit)} fit images", "budget": budget, "tried": tried,
                         "stepped_back": back}  # fmt: skip
    state.guard.notes.append(line)
    return PassResult(len(tried))
