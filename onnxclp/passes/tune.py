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

What was tried, and why the choice, goes into the guard's entry of the report (``tuned``) and on stderr.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxclp.guard import choose_strongest
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
    from onnxclp.io import TensorStore
    from onnxclp.passes import exclude, find, prune, score, streams

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
    for p in (streams.run, prune.run):
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
    budget = float(state.guard.budget) * float(getattr(state.method, "tune_share", 1.0))
    specs = {p.name: p for p in state.method.params}
    values = dict(state.params.values)
    calibrated = [n for n in names if n != "u"]
    for n in calibrated:
        values[n] = specs[n].calibration[0]  # type: ignore[index]  # least invasive while u walks
    tried: list[dict[str, Any]] = []

    seen: dict[tuple, np.ndarray] = {}  # the same decisions give the same model: measured once

    def measure(trial: dict[str, Any]) -> np.ndarray:
        copy = _apply(state, snapshot, trial)
        key = tuple(
            (d.scored.layer.key, tuple(d.selection.prune), tuple(d.selection.rescale), repr(d.topk))
            for d in copy.decisions
        )
        if key not in seen:
            seen[key] = predict(copy.model, copy.store, x_fit, device) == y_fit
        pruned = sum(len(d.selection.prune) for d in copy.decisions)
        tried.append({**{k: trial[k] for k in names if k in trial}, "pruned": pruned})
        return seen[key]

    why: list[str] = []
    if "u" in names:
        grid = [float(u) for u in ctx.get("u_grid") or DEFAULT_U_GRID]
        grid = sorted({u for u in grid if "u_low" not in values or u > values["u_low"]}, reverse=True)
        trials = [{**values, "u": u} for u in grid]
        i, steps = choose_strongest(trials, measure, right_input, budget)
        _annotate(tried, steps)
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
        i, steps = choose_strongest(trials, measure, right_input, budget)
        _annotate(tried, steps)
        if i is not None:
            values[n] = trials[i][n]
            why.append(f"{n}={values[n]:g} (drop {steps[i]['drop']:.1f} pt)")
    chosen = {n: values[n] for n in names}
    state.params = replace(state.params, values=values)
    state.guard.tuned = {"parameters": chosen, "on": f"{len(y_fit)} fit images", "budget": budget, "tried": tried}
    line = f"tuned on the {len(y_fit)} fit images (strongest within {budget:g} pt; the validation part checks it): " + (
        ", ".join(why) if why else "defaults kept"
    )
    state.guard.notes.append(line)
    return PassResult(len(tried))


def _annotate(tried: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
    for t, s in zip(tried[-len(steps) :], steps, strict=True):
        t.update(acc=s["acc"], drop=s["drop"], within=s["within"])
