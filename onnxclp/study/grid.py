"""Evaluation grids: (model × method × parameters × attack) cells, each sanitized in memory and measured.

A grid is read from a JSON or YAML file (:func:`load_config`, format in docs/scale.md, "Grid") into a
:class:`GridSpec`; :func:`expand` lists its cells in a stable order (model, then attack, then the baseline and
each method's settings); :func:`run_grid` runs them through :func:`onnxclp.scale.run_tasks` (in this process, a
process pool or Ray) and returns one JSON-ready dict per cell, identical whatever the backend.

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
- **Errors stay in their cell.** A method that refuses a model, or a worker that dies, gives that cell an
  ``error`` line; the other cells complete.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxclp.errors import OnnxclpError
from onnxclp.eval.options import RunOptions

PathLike = str | os.PathLike[str]

__all__ = [
    "AttackSpec",
    "Cell",
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

#: Keys of an attack entry: the RunOptions fields an attack sets (``config`` is ``attack_config``).
ATTACK_KEYS = ("config", "attack", "params", "target", "mode", "seed", "mean", "std")
#: Keys of the config's ``run`` section: RunOptions fields shared by every cell.
RUN_KEYS = ("batch_size", "device", "threads", "mean", "std", "layout", "input_size", "x_key", "y_key")
#: Parameters every method takes besides its registry parameters.
COMMON_PARAMS = ("score", "include_fc")
#: Prepared (model, attack) groups a worker keeps (CIFAR-10, 10,000 images: ~250 MB each, float32).
KEEP_PREPARED = 2


@dataclass(frozen=True)
class AttackSpec:
    """One attack: a label (the config path as written, or the attack name) and its RunOptions overrides."""

    label: str
    options: tuple[tuple[str, Any], ...] = ()

    def overrides(self) -> dict[str, Any]:
        """The RunOptions fields this attack sets."""
        return dict(self.options)


@dataclass(frozen=True)
class ModelSpec:
    """One model: a label (the path as written in the config), the resolved path, and its own attacks (None:
    the grid's)."""

    label: str
    path: str
    attacks: tuple[AttackSpec, ...] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """One method entry: fixed parameters and the axes varied (their cartesian product, in the order given)."""

    method: str
    fixed: tuple[tuple[str, Any], ...] = ()
    axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def settings(self) -> list[dict[str, Any]]:
        """Every parameter setting of this entry, in order (the last axis varies fastest)."""
        names = [n for n, _ in self.axes]
        out = []
        for combo in itertools.product(*(values for _, values in self.axes)):
            out.append({**dict(self.fixed), **dict(zip(names, combo, strict=True))})
        return out


@dataclass
class GridSpec:
    """A whole grid: models, methods, attacks, the data, and the run options shared by every cell."""

    models: list[ModelSpec]
    methods: list[MethodSpec]
    attacks: list[AttackSpec]
    data: str
    options: RunOptions = field(default_factory=RunOptions)
    baseline: bool = True
    data_label: str | None = None

    def attacks_of(self, model: ModelSpec) -> tuple[AttackSpec, ...]:
        """The attacks ``model`` is measured under."""
        return model.attacks if model.attacks is not None else tuple(self.attacks)


@dataclass(frozen=True)
class Cell:
    """One cell: indices into the spec (model, attack), the method (None: the model as given) and parameters."""

    model: int
    attack: AttackSpec
    method: str | None
    params: tuple[tuple[str, Any], ...] = ()

    def settings(self, spec: GridSpec) -> dict[str, Any]:
        """The JSON-ready settings of this cell."""
        return {
            "model": spec.models[self.model].label,
            "attack": self.attack.label,
            "method": self.method,
            "params": dict(self.params),
        }


# ----------------------------------------------------------------------------------------------------------------
# The config file


def load_config(path: PathLike) -> dict[str, Any]:
    """The config at ``path`` as a dict: JSON, or YAML (``.yaml``/``.yml``, needs PyYAML)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise OnnxclpError(f"cannot read grid config {p}: {exc.strerror or exc}") from exc
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise OnnxclpError(
                "a YAML grid config needs PyYAML: pip install pyyaml (or write the config as JSON)"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise OnnxclpError(f"{p}: not valid YAML: {' '.join(str(exc).split())}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OnnxclpError(f"{p}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise OnnxclpError(f"{p}: a grid config is a mapping (models, methods, attacks, data...)")
    return data


def _path(value: Any, base: Path, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise OnnxclpError(f"grid config: {what} must be a path, got {value!r}")
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def _attack(entry: Any, base: Path, where: str) -> AttackSpec:
    """``"zoo/x/attack.json"`` (a file: an attack config), ``"badnets"`` (an attack name), or a mapping of
    :data:`ATTACK_KEYS` (``config`` a path; ``label`` optional)."""
    if isinstance(entry, str):
        if entry.lower().endswith((".json", ".yaml", ".yml")) or os.sep in entry or "/" in entry:
            return AttackSpec(entry, (("attack_config", _path(entry, base, where)),))
        return AttackSpec(entry, (("attack", entry),))
    if not isinstance(entry, Mapping):
        raise OnnxclpError(f"grid config: {where} must be an attack config path, an attack name or a mapping")
    unknown = sorted(set(entry) - {*ATTACK_KEYS, "label"})
    if unknown:
        raise OnnxclpError(
            f"grid config: {where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(ATTACK_KEYS)})"
        )
    opts: dict[str, Any] = {}
    for key in ATTACK_KEYS:
        if entry.get(key) is None:
            continue
        if key == "config":
            opts["attack_config"] = _path(entry[key], base, f"{where}.config")
        elif key == "params":
            if not isinstance(entry[key], Mapping):
                raise OnnxclpError(f"grid config: {where}.params must be a mapping")
            opts["params"] = dict(entry[key])
        else:
            opts[key] = entry[key]
    if not opts:
        raise OnnxclpError(f"grid config: {where}: give 'config' or 'attack'")
    label = entry.get("label") or entry.get("config") or entry.get("attack")
    if entry.get("params") and "label" not in entry:
        label = f"{label} {json.dumps(entry['params'], sort_keys=True)}"
    return AttackSpec(str(label), tuple(sorted(opts.items(), key=lambda kv: kv[0])))


def _freeze(value: Any) -> Any:
    """Lists as tuples, so that a spec is hashable and compares by value."""
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _methods(entries: Any, defaults: Mapping[str, Any]) -> list[MethodSpec]:
    """Method entries: a registry name, or ``{"method": NAME, PARAM: value | [values] | "START:STOP:STEP"}``.
    ``defaults`` (the config's ``params``) apply to every method that declares the parameter."""
    from onnxclp import methods
    from onnxclp.study.sweep import parse_grid

    if isinstance(entries, str | Mapping):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise OnnxclpError("grid config: 'methods' must be a non-empty list of method names or mappings")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, Mapping) or not isinstance(entry.get("method"), str):
            raise OnnxclpError(f"grid config: methods[{i}] needs a 'method' name")
        name = entry["method"]
        m = methods.get(name)  # an unknown name is a usage error listing the choices
        declared = {p.name for p in m.params} | set(COMMON_PARAMS)
        given = {k: v for k, v in defaults.items() if k in declared}
        given.update({k: v for k, v in entry.items() if k != "method"})
        foreign = sorted(set(given) - declared)
        if foreign:
            raise OnnxclpError(
                f"grid config: methods[{i}] ({name}) has no parameter {', '.join(foreign)} "
                f"(it takes: {', '.join(sorted(declared))})"
            )
        fixed, axes = [], []
        for k, v in given.items():
            spec = m.spec(k)
            numeric = spec is not None and spec.type in (int, float)
            if isinstance(v, str) and numeric and (":" in v or "," in v):
                v = [spec.type(x) for x in parse_grid(v)]  # type: ignore[union-attr]
            if isinstance(v, list):
                if not v:
                    raise OnnxclpError(f"grid config: methods[{i}].{k} is an empty list")
                axes.append((k, tuple(_freeze(x) for x in v)))
            else:
                fixed.append((k, _freeze(v)))
        out.append(MethodSpec(name, tuple(fixed), tuple(axes)))
    return out


def parse_config(config: Mapping[str, Any], base_dir: PathLike = ".", **overrides: Any) -> GridSpec:
    """A :class:`GridSpec` from a config mapping (docs/scale.md, "Grid"). Relative paths are taken from
    ``base_dir`` (the config file's folder). ``overrides``: ``data``, ``limit``, ``device``, ``batch_size``,
    ``threads`` from the command line (None: keep the config's)."""
    base = Path(base_dir)
    known = {"models", "methods", "attacks", "params", "data", "limit", "run", "baseline"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise OnnxclpError(f"grid config: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    attacks_raw = config.get("attacks", [])
    if isinstance(attacks_raw, str | Mapping):
        attacks_raw = [attacks_raw]
    attacks = [_attack(a, base, f"attacks[{i}]") for i, a in enumerate(attacks_raw or [])]
    models_raw = config.get("models")
    if isinstance(models_raw, str):
        models_raw = [models_raw]
    if not isinstance(models_raw, list) or not models_raw:
        raise OnnxclpError("grid config: 'models' must be a non-empty list of model paths")
    models = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            models.append(ModelSpec(m, _path(m, base, f"models[{i}]")))
            continue
        if not isinstance(m, Mapping) or "path" not in m:
            raise OnnxclpError(f"grid config: models[{i}] must be a path or a mapping with 'path'")
        own = m.get("attacks")
        if isinstance(own, str | Mapping):
            own = [own]
        own_specs = (
            None if own is None else tuple(_attack(a, base, f"models[{i}].attacks[{j}]") for j, a in enumerate(own))
        )
        models.append(
            ModelSpec(str(m.get("label") or m["path"]), _path(m["path"], base, f"models[{i}].path"), own_specs)
        )
    if not attacks and any(m.attacks is None for m in models):
        attacks = [AttackSpec("none", (("attack", "none"),))]
    defaults = config.get("params") or {}
    if not isinstance(defaults, Mapping):
        raise OnnxclpError("grid config: 'params' must be a mapping of parameter defaults")
    methods = _methods(config.get("methods", ["clp"]), defaults)
    run = dict(config.get("run") or {})
    bad = sorted(set(run) - set(RUN_KEYS))
    if bad:
        raise OnnxclpError(f"grid config: run: unknown key(s) {', '.join(bad)} (known: {', '.join(RUN_KEYS)})")
    data_cli = overrides.pop("data", None)
    data_label = str(data_cli) if data_cli is not None else config.get("data")
    if data_label is None:
        raise OnnxclpError("grid config: no 'data' (or pass --data)")
    data = str(data_cli) if data_cli is not None else _path(data_label, base, "data")
    limit = overrides.pop("limit", None)
    limit = limit if limit is not None else config.get("limit")
    run.update({k: v for k, v in overrides.items() if v is not None})
    try:
        options = RunOptions(limit=limit, prefetch=0, **run)
    except TypeError as exc:
        raise OnnxclpError(f"grid config: {exc}") from exc
    baseline = config.get("baseline", True)
    if not isinstance(baseline, bool):
        raise OnnxclpError("grid config: 'baseline' must be true or false")
    return GridSpec(models, methods, attacks, data, options, baseline, str(data_label))


def expand(spec: GridSpec) -> list[Cell]:
    """The cells in their stable order: for each model, each of its attacks: the baseline (when asked for),
    then each method entry's settings in order."""
    cells = []
    for mi, model in enumerate(spec.models):
        for attack in spec.attacks_of(model):
            if spec.baseline:
                cells.append(Cell(mi, attack, None))
            for m in spec.methods:
                for setting in m.settings():
                    cells.append(Cell(mi, attack, m.method, tuple(setting.items())))
    return cells


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
    tasks = [
        _Task(spec.models[c.model].path, attacks.index(c.attack), c.attack.options, c.method, c.params, spec.options)
        for c in cells
    ]
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
    ``pruned``/``rescaled`` of ``channels``, ``sanitize_s``, and ``error`` (None, or one line: the cell's
    metrics are then None). ``workers``/``ray``/``retries``/``progress`` as :func:`onnxclp.scale.run_tasks`."""
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


_METRIC_KEYS = ("acc", "asr", "ra", "n_samples", "n_attacked", "pruned", "rescaled", "channels", "sanitize_s")


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


def table(cells: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Rows of text, header first: model, attack, method, parameters, ACC, ASR, RA, pruned (or the error)."""
    rows = [["model", "attack", "method", "params", "ACC %", "ASR %", "RA %", "pruned"]]
    for c in cells:
        row = [str(c["model"]), str(c["attack"]), c["method"] or "(none)", _fmt_params(c["params"])]
        if c.get("error"):
            row += ["error", "", "", c["error"]]
        else:
            pruned = "-" if c["method"] is None else f"{c['pruned']}/{c['channels']}"
            row += [_pct(c["acc"]), _pct(c["asr"]), _pct(c["ra"]), pruned]
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
    result: dict[str, Any] = {"pruned": 0, "rescaled": 0, "channels": None, "sanitize_s": 0.0}
    model = proto
    if task.method is not None:
        from onnxclp.api import sanitize

        model, report = sanitize(proto, task.method, force=True, **dict(task.params))  # measured: risky u allowed
        result.update(
            pruned=report.pruned_channels,
            rescaled=report.rescaled_channels,
            channels=report.total_channels,
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
