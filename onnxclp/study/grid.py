"""Evaluation grids: (model × method × parameters × attack) cells, each sanitized in memory and measured.

A grid is read from a JSON or YAML file (:func:`load_config`, format in docs/scale.md, "Grid") into a
:class:`GridSpec`; :func:`expand` lists its cells in a stable order (model, then attack, then the baseline and
each method's settings); that half is :mod:`onnxclp.study.gridspec`. :func:`run_grid` runs the cells through
:func:`onnxclp.scale.run_tasks` (in this process, a process pool or Ray) and returns one JSON-ready dict per
cell, identical whatever the backend.

How the work is shared out:

- **The test set travels once.** The driver reads an array data set (``.npz``, CIFAR batches) once, keeps only
  the samples some attack draws (``limit`` draws with each attack's seed, as ``onnxclp evaluate`` does) and
  hands it to ``run_tasks(shared=...)``: one ``ray.put``, or once per pool worker. An image folder stays on disk
  (decoded on demand, a batch at a time); each worker opens it by path.
- **Models travel by path**; a task is one cell (a few small values).
- **One preparation per (model, attack) per worker.** A worker keeps the model's proto and the prepared batches
  of the last (model, attack) groups it saw (:func:`onnxclp.study.measure.prepare`: the evaluator's own
  ``prepare_run``, so the numbers are ``evaluate``'s); the cells of a group are consecutive, so a worker
  prepares each group at most once (``prepared_count`` counts them).
- **The clean images travel once too.** With ``clean_data`` in the config, the driver reads the clean set once,
  keeps the ``n`` images the methods would draw (the seeded subset of :func:`onnxclp.methods._fewshot.clean_images`)
  and ships them in the same shared dict; each method cell gets them as ``context["clean_arrays"]``, so the
  few-shot methods train on them and the accuracy guard (:mod:`onnxclp.guard`) measures every method on their
  validation part. A folder of images is read once per worker instead (at the model's input size).
- **Errors stay in their cell.** A method that refuses a model, a result the accuracy guard refuses, or a worker
  that dies gives that cell an ``error`` line; the other cells complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxclp.errors import OnnxclpError
from onnxclp.eval.options import RunOptions
from onnxclp.study.gridspec import (  # re-exported: the config half of the grid
    AttackSpec,
    Cell,
    CleanSpec,
    GridSpec,
    MethodSpec,
    ModelSpec,
    expand,
    load_config,
    parse_config,
)

PathLike = str | os.PathLike[str]

__all__ = [
    "AttackSpec",
    "Cell",
    "CleanSpec",
    "GridSpec",
    "MethodSpec",
    "ModelSpec",
    "expand",
    "grid_json",
    "load_config",
    "parse_config",
    "prepared_count",
    "run_grid",
    "sweep_parallel",
    "table",
    "write_atomic",
]


#: What a written cell records of the accuracy guard's report entry (``report.guard``).
GUARD_KEYS = ("n_fit", "n_val", "acc_before", "acc_after", "drop", "bound", "confidence", "changed", "ci95",
              "p_within", "accepted", "forced", "selected_on_validation")  # fmt: skip
#: Prepared (model, attack) groups a worker keeps (CIFAR-10, 10,000 images: ~250 MB each, float32).
KEEP_PREPARED = 2


# ----------------------------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class _Task:
    """What one cell task receives (small: paths and values; the data comes from ``get_shared()``)."""

    model: str
    attack_key: int
    attack: tuple[tuple[str, Any], ...]
    method: str | None
    params: tuple[tuple[str, Any], ...]
    options: RunOptions
    clean_key: int | None = None  # index into the shared ``clean`` list (None: no clean images)
    clean: CleanSpec | None = None
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # the clean images' mean and std


def _share_clean(cleans: list[CleanSpec]) -> list[dict[str, Any]]:
    """Each clean set, read once by the driver: the arrays of the ``n`` images the methods would draw (the
    seeded subset of :func:`onnxclp.methods._fewshot.clean_images`, so that the cells see the images
    ``sanitize --clean-data PATH --clean-n N`` reads), or only the path for an image folder (read once per
    worker, at the model's input size). Too few images for the guard's split is a usage error here, before
    any work."""
    import numpy as np

    from onnxclp.eval.data import ArrayImages, load_dataset
    from onnxclp.guard import DEFAULT_VAL_FRACTION, split_indices
    from onnxclp.methods._fewshot import SEED

    out = []
    for c in cleans:
        data = load_dataset(c.path, c.x_key, c.y_key)
        if len(data) == 0:
            raise OnnxclpError(f"clean_data {c.label}: no images")
        n = min(c.n, len(data))
        split_indices(n, c.val_fraction or DEFAULT_VAL_FRACTION)  # raises when too few for the guard's split
        entry: dict[str, Any] = {"x": None, "y": None, "label": c.label, "path": c.path}
        if isinstance(data, ArrayImages):
            idx = np.arange(len(data))
            if len(data) > c.n:
                idx = np.sort(np.random.default_rng(SEED).permutation(len(data))[: c.n])
            entry["x"] = np.ascontiguousarray(data.x[idx])
            entry["y"] = np.ascontiguousarray(data.labels[idx])
        out.append(entry)
    return out


def _share_data(spec: GridSpec, attacks: list[AttackSpec]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The shared dict (``data``: the data set subset to the samples drawn, or None for an image folder;
    ``indices``: each distinct attack's samples in it) and each attack's resolved configuration. Attack configs
    are resolved here, once, so that a bad one fails before any work."""
    import numpy as np

    from onnxclp.eval.data import ArrayImages, load_dataset
    from onnxclp.eval.run import _select, resolve_attack

    resolved = []
    for a in attacks:
        o = spec.options.replace(**a.overrides())
        resolved.append((o, resolve_attack(o)[0]))
    configs = [cfg.to_dict() for _, cfg in resolved]
    data = load_dataset(spec.data, spec.options.x_key, spec.options.y_key)
    if not isinstance(data, ArrayImages):  # an image folder: opened by path in each worker, decoded on demand
        return {"data": None, "indices": None, "data_path": spec.data}, configs
    picks = [_select(len(data), o, cfg.seed) for o, cfg in resolved]
    union = np.unique(np.concatenate(picks))
    subset = ArrayImages(
        np.ascontiguousarray(data.x[union]), np.ascontiguousarray(data.labels[union]), data.layout, data.description
    )
    indices = [np.searchsorted(union, idx) for idx in picks]
    return {"data": subset, "indices": indices, "data_path": spec.data}, configs


def resolve(spec: GridSpec) -> tuple[list[Cell], list[_Task], dict[str, Any], list[dict[str, Any]]]:
    """The cells, their tasks, the shared dict and the resolved configuration of each distinct attack."""
    cells = expand(spec)
    attacks: list[AttackSpec] = []
    for c in cells:
        if c.attack not in attacks:
            attacks.append(c.attack)
    shared, configs = _share_data(spec, attacks) if cells else ({}, [])
    cleans: list[CleanSpec] = []
    for c in cells:
        cs = spec.clean_of(spec.models[c.model])
        if c.method is not None and cs is not None and cs not in cleans:
            cleans.append(cs)
    if cleans:
        shared["clean"] = _share_clean(cleans)
    tasks = []
    for c in cells:
        ak = attacks.index(c.attack)
        cs = spec.clean_of(spec.models[c.model]) if c.method is not None else None
        norm = None
        if cs is not None and cs.mean is not None and cs.std is not None:
            norm = (cs.mean, cs.std)
        elif cs is not None and configs[ak].get("normalize") is not None:  # as the cell's images are normalised
            nz = configs[ak]["normalize"]
            norm = (tuple(float(v) for v in nz["mean"]), tuple(float(v) for v in nz["std"]))
        tasks.append(
            _Task(
                spec.models[c.model].path,
                ak,
                c.attack.options,
                c.method,
                c.params,
                spec.options,
                None if cs is None else cleans.index(cs),
                cs,
                norm,
            )
        )
    return cells, tasks, shared, configs


def run_grid(
    spec: GridSpec,
    *,
    workers: int | None = 1,
    ray: str | None = None,
    retries: int = 1,
    progress: bool | Callable[[int, int], None] | None = False,
) -> list[dict[str, Any]]:
    """Every cell of ``spec`` (:func:`expand`), as a JSON-ready dict each, in order: the settings (``model``,
    ``attack``, ``method``, ``params``), ``acc``/``asr``/``ra``, ``n_samples``/``n_attacked``, the channels
    ``pruned``/``rescaled`` of ``channels``, ``guard`` (with clean data: the accuracy guard's :data:`GUARD_KEYS`
    on the validation images; None otherwise), ``sanitize_s``, and ``error`` (None, or one line: the cell's
    metrics are then None; a result the guard refuses is such a line). ``workers``/``ray``/``retries``/
    ``progress`` as :func:`onnxclp.scale.run_tasks`."""
    return _run(spec, workers=workers, ray=ray, retries=retries, progress=progress)[0]


def _run(spec: GridSpec, **run: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`run_grid`'s cells, and the resolved configuration of each distinct attack."""
    from onnxclp.scale import run_tasks

    cells, tasks, shared, configs = resolve(spec)
    if not cells:
        return [], configs
    outcomes = run_tasks(_cell_task, tasks, shared=shared, **run)
    out = []
    for c, o in zip(cells, outcomes, strict=True):
        entry = c.settings(spec)
        if o.ok:
            assert o.value is not None
            entry.update(o.value)
            entry["error"] = None
        else:
            entry.update(dict.fromkeys(_METRIC_KEYS))
            entry["error"] = o.error or "failed"
        out.append(entry)
    return out, configs


def sweep_parallel(
    model: PathLike,
    data: PathLike,
    options: RunOptions,
    us: Sequence[float],
    method: str = "clp",
    *,
    fixed: Mapping[str, Any] | None = None,
    name: str | None = None,
    workers: int | None = None,
    ray: str | None = None,
) -> Any:
    """``onnxclp sweep --workers N / --ray``: the sweep over ``us`` as a one-model, one-attack grid (the baseline
    and one cell per u), returned as the :class:`~onnxclp.study.sweep.SweepResult` the serial sweep gives (same
    numbers). A cell that fails raises its error, as the serial sweep does."""
    from onnxclp.study.sweep import SweepPoint, SweepResult

    fixed = dict(fixed or {})
    spec = GridSpec(
        [ModelSpec(name or str(model), str(model))],
        [MethodSpec(method, tuple(fixed.items()), (("u", tuple(float(u) for u in us)),))],
        [AttackSpec("run")],
        str(data),
        options.replace(prefetch=0),
        True,
        str(data),
    )
    cells, configs = _run(spec, workers=workers, ray=ray)
    for c in cells:
        if c["error"] is not None:
            where = "the model as given" if c["method"] is None else f"u={_fmt_params(c['params'])[2:]}"
            raise OnnxclpError(f"{where}: {c['error']}")
    base, points = cells[0], cells[1:]
    result = SweepResult(
        model=name or str(model), method=method, fixed=fixed, data=str(data), attack=configs[0],
        n_samples=base["n_samples"], n_attacked=base["n_attacked"], baseline_acc=base["acc"],
        baseline_asr=base["asr"], baseline_ra=base["ra"],
    )  # fmt: skip
    for p in points:
        result.points.append(
            SweepPoint(
                settings={"u": p["params"]["u"]}, acc=p["acc"], asr=p["asr"], ra=p["ra"], pruned=p["pruned"],
                rescaled=p["rescaled"], channels=p["channels"], sanitize_s=p["sanitize_s"],
            )
        )  # fmt: skip
    return result


_METRIC_KEYS = (
    "acc", "asr", "ra", "n_samples", "n_attacked", "pruned", "rescaled", "channels", "guard", "sanitize_s",
)  # fmt: skip


def grid_json(spec: GridSpec, cells: Sequence[Mapping[str, Any]], timings: bool = False) -> str:
    """The grid's JSON document: the data, the limit and the cells (``sanitize_s`` only with ``timings``: without
    it, the text is the same on every run and backend)."""
    doc = {
        "data": spec.data_label or spec.data,
        "limit": spec.options.limit,
        "cells": [{k: v for k, v in c.items() if timings or k != "sanitize_s"} for c in cells],
    }
    return json.dumps(doc, indent=2) + "\n"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _fmt_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


def _guard_cell(g: Mapping[str, Any] | None) -> str:
    if not g or g.get("acc_after") is None:
        return "-"
    mark = " FORCED" if g.get("forced") else ""
    return f"{100 * g['acc_before']:.1f}->{100 * g['acc_after']:.1f}{mark}"


def table(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows of text, header first: model, attack, method, parameters, ACC, ASR, RA, (with clean data: the
    guard's validation accuracy before -> after), pruned (or the error)."""
    guard = any(c.get("guard") for c in cells)
    rows = [["model", "attack", "method", "params", "ACC %", "ASR %", "RA %", *(["val ACC %"] if guard else []),
             "pruned"]]  # fmt: skip
    for c in cells:
        row = [str(c["model"]), str(c["attack"]), c["method"] or "(none)", _fmt_params(c["params"])]
        if c.get("error"):
            row += ["error", "", "", *([""] if guard else []), c["error"]]
        else:
            pruned = "-" if c["method"] is None else f"{c['pruned']}/{c['channels']}"
            row += [_pct(c["acc"]), _pct(c["asr"]), _pct(c["ra"]), *([_guard_cell(c.get("guard"))] if guard else []),
                    pruned]  # fmt: skip
        rows.append(row)
    return rows


def write_atomic(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: an interrupted run
    leaves the old file (or none), never a partial one."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OnnxclpError(f"cannot write {p}: {exc.strerror or exc}") from exc
        raise


# ----------------------------------------------------------------------------------------------------------------
# The worker side

_PROTOS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_PREPARED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_FOLDERS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()  # clean image folders, decoded once per worker
_COUNT = {"prepared": 0}


def prepared_count() -> int:
    """(model, attack) preparations made by this process so far (the tests and the bench read it)."""
    return _COUNT["prepared"]


def _model_key(path: str) -> tuple[Any, ...]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _remember(cache: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = build()
    cache[key] = value
    while len(cache) > KEEP_PREPARED:
        cache.popitem(last=False)
    return value


def _clean_context(task: _Task, proto: Any, opts: RunOptions, shared: Mapping[str, Any]) -> dict[str, Any]:
    """The ``sanitize(context=...)`` of a method cell given clean images: the shared arrays as
    ``clean_arrays`` (an image folder: decoded here once per worker at the model's input size) and the guard's
    settings."""
    from types import SimpleNamespace

    assert task.clean is not None and task.clean_key is not None
    c, entry = task.clean, shared["clean"][task.clean_key]
    if entry["x"] is not None:
        arrays = (entry["x"], entry["y"], entry["label"])
    else:
        import numpy as np

        from onnxclp.eval.data import load_dataset
        from onnxclp.methods._fewshot import SEED, input_layout

        # the model's input (channels, H, W): what clean_images would decode the folder to
        like_state: Any = SimpleNamespace(model=proto, params=SimpleNamespace(method=task.method))
        _, channels, hw = input_layout(like_state)

        def decode() -> Any:
            data = load_dataset(c.path, c.x_key, c.y_key, channels=channels, size=hw)
            idx = np.arange(len(data))
            if len(data) > c.n:
                idx = np.sort(np.random.default_rng(SEED).permutation(len(data))[: c.n])
            return data.images(idx).numpy(), np.asarray(data.labels)[idx], entry["label"]

        arrays = _remember(_FOLDERS, (c.path, c.x_key, c.y_key, c.n, channels, hw), decode)
    mean, std = task.normalize if task.normalize is not None else (None, None)
    return {
        "clean_arrays": arrays,
        "clean_data": c.path,  # a label only (the arrays are used); some methods name it in messages
        "clean_n": c.n,
        "x_key": c.x_key,
        "y_key": c.y_key,
        "val_fraction": c.val_fraction,
        "select_fraction": c.select_fraction,
        "max_acc_drop": c.max_acc_drop,
        "mean": None if mean is None else list(mean),
        "std": None if std is None else list(std),
        "device": opts.device,
        "quiet": True,
    }


def _guard_entry(guard: Mapping[str, Any] | None, force: bool) -> dict[str, Any] | None:
    """The cell's ``guard`` (:data:`GUARD_KEYS` of ``report.guard``). A result over the budget raises the
    guard's own :class:`~onnxclp.guard.Refused` (same rule, same message) unless ``force``: the cell ran with
    ``force=True`` so that risky parameter values are measured, which also lets the guard pass it through."""
    if guard is None:
        return None
    if guard.get("forced") and not force:
        from onnxclp.guard import Drop, GuardResult, decide

        fields = {k: v for k, v in guard.items() if k in GuardResult.__dataclass_fields__}
        result = GuardResult(**{**fields, "notes": [], "forced": False})
        drop = Drop(guard["acc_before"], guard["acc_after"], guard["drop"], guard["se"] or 0.0, guard["n_val"],
                    guard.get("changed") or 0)  # fmt: skip
        decide(result, drop, guard.get("changed_predictions") or 0.0, False)  # raises Refused
    out = {k: guard.get(k) for k in GUARD_KEYS}
    if out["ci95"] is not None:
        out["ci95"] = list(out["ci95"])
    return out


def _cell_task(task: _Task) -> dict[str, Any]:
    """One cell, in a worker: the (cached) proto and prepared batches of its (model, attack), then sanitize (for
    a method cell) and measure. Raises for a cell that cannot be run (run_tasks turns it into an error line)."""
    from onnxclp.scale import get_shared, worker_threads
    from onnxclp.study.measure import load_inline, measure, prepare

    shared = get_shared()
    key = _model_key(task.model)
    opts = task.options.replace(**dict(task.attack))
    if opts.threads is None and worker_threads() is not None:
        opts = opts.replace(threads=worker_threads())
    group = (*key, task.attack_key, json.dumps(task.attack, sort_keys=True, default=str), repr(opts))
    data = shared["data"] if shared.get("data") is not None else shared["data_path"]
    if shared.get("indices") is not None:
        opts = opts.replace(indices=shared["indices"][task.attack_key], limit=None)

    def build() -> Any:
        with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; they are only read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            prepared = prepare(task.model, data, options=opts)
        _COUNT["prepared"] += 1
        return prepared

    prepared = _remember(_PREPARED, group, build)
    proto = _remember(_PROTOS, key, lambda: load_inline(task.model))
    result: dict[str, Any] = {"pruned": 0, "rescaled": 0, "channels": None, "guard": None, "sanitize_s": 0.0}
    model = proto
    if task.method is not None:
        from onnxclp import methods
        from onnxclp.api import sanitize

        context: dict[str, Any] = {"quiet": True}
        if task.clean is not None:
            context = _clean_context(task, proto, opts, shared)
        elif methods.get(task.method).needs == "clean-data":
            raise OnnxclpError(
                f"{task.method} needs clean labelled images: give 'clean_data' in the grid config (docs/scale.md)"
            )
        with warnings.catch_warnings():  # Ray's zero-copy clean arrays are read-only; they are only read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            model, report = sanitize(proto, task.method, force=True, context=context, **dict(task.params))
        # force=True: risky u are measured too; the guard's refusal is applied by _guard_entry
        result.update(
            pruned=report.pruned_channels,
            rescaled=report.rescaled_channels,
            channels=report.total_channels,
            guard=_guard_entry(report.guard, task.clean is not None and task.clean.force),
            sanitize_s=report.time_s,
        )
    m = measure(model, prepared)
    return {
        "acc": m.acc,
        "asr": m.asr if prepared.has_attack else None,
        "ra": m.ra if prepared.has_attack else None,
        "n_samples": prepared.n_samples,
        "n_attacked": prepared.n_attacked if prepared.has_attack else 0,
        **result,
    }
