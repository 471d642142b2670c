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
import itertools
import json
import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnxclp.errors import OnnxclpError
from onnxclp.eval.options import RunOptions

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

#: Keys of an attack entry: the RunOptions fields an attack sets (``config`` is ``attack_config``).
ATTACK_KEYS = ("config", "attack", "params", "target", "mode", "seed", "mean", "std")
#: Keys of the config's ``run`` section: RunOptions fields shared by every cell.
RUN_KEYS = ("batch_size", "device", "threads", "mean", "std", "layout", "input_size", "x_key", "y_key")
#: Keys of a ``clean_data`` entry (a path alone is ``{"path": ...}``).
CLEAN_KEYS = ("path", "n", "x_key", "y_key", "val_fraction", "max_acc_drop", "mean", "std", "force")
#: What a written cell records of the accuracy guard's report entry (``report.guard``).
GUARD_KEYS = ("n_fit", "n_val", "acc_before", "acc_after", "drop", "ci95", "p_within", "accepted", "forced",
              "selected_on_validation")  # fmt: skip
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
class CleanSpec:
    """The clean labelled images given to every method cell (the few-shot methods' data and the accuracy
    guard's validation part): ``label`` is the path as written, ``path`` the resolved one; the rest are the
    ``sanitize --clean-n/--x-key/--y-key/--val-fraction/--max-acc-drop/--mean/--std`` settings (None: the
    defaults; ``mean``/``std`` None: the attack's normalisation). ``force``: a result over the budget is
    measured anyway (its cell then has ``guard.forced``) instead of being an error entry."""

    label: str
    path: str
    n: int = 500
    x_key: str | None = None
    y_key: str | None = None
    val_fraction: float | None = None
    max_acc_drop: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    force: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One model: a label (the path as written in the config), the resolved path, its own attacks (None: the
    grid's) and its own clean data (when ``own_clean``; None then: none for this model)."""

    label: str
    path: str
    attacks: tuple[AttackSpec, ...] | None = None
    clean: CleanSpec | None = None
    own_clean: bool = False


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
    clean: CleanSpec | None = None

    def attacks_of(self, model: ModelSpec) -> tuple[AttackSpec, ...]:
        """The attacks ``model`` is measured under."""
        return model.attacks if model.attacks is not None else tuple(self.attacks)

    def clean_of(self, model: ModelSpec) -> CleanSpec | None:
        """The clean images ``model``'s method cells get (None: none)."""
        return model.clean if model.own_clean else self.clean


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


def _floats(value: Any, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise OnnxclpError(f"grid config: {what} must be a list of numbers, got {value!r}") from None


def _clean(entry: Any, base: Path, where: str) -> CleanSpec | None:
    """``"clean.npz"`` (a path) or a mapping of :data:`CLEAN_KEYS` (``path`` required); None: no clean data."""
    if entry is None:
        return None
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, Mapping) or "path" not in entry:
        raise OnnxclpError(f"grid config: {where} must be a path or a mapping with 'path'")
    unknown = sorted(set(entry) - set(CLEAN_KEYS))
    if unknown:
        raise OnnxclpError(
            f"grid config: {where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(CLEAN_KEYS)})"
        )
    n = entry.get("n", 500)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise OnnxclpError(f"grid config: {where}.n must be a positive integer, got {n!r}")
    numbers = {}
    for key in ("val_fraction", "max_acc_drop"):
        v = entry.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise OnnxclpError(f"grid config: {where}.{key} must be a number, got {v!r}")
        numbers[key] = None if v is None else float(v)
    if numbers["max_acc_drop"] is not None and numbers["max_acc_drop"] < 0:
        raise OnnxclpError(f"grid config: {where}.max_acc_drop must be >= 0")
    mean, std = _floats(entry.get("mean"), f"{where}.mean"), _floats(entry.get("std"), f"{where}.std")
    if (mean is None) != (std is None):
        raise OnnxclpError(f"grid config: {where}: give both mean and std, or neither")
    force = entry.get("force", False)
    if not isinstance(force, bool):
        raise OnnxclpError(f"grid config: {where}.force must be true or false")
    return CleanSpec(
        str(entry["path"]), _path(entry["path"], base, f"{where}.path"), n, entry.get("x_key"), entry.get("y_key"),
        numbers["val_fraction"], numbers["max_acc_drop"], mean, std, force,
    )  # fmt: skip


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
    ``threads``, ``clean_data`` (the grid's clean set), ``clean_n``, ``max_acc_drop`` (every clean set's) from
    the command line (None: keep the config's)."""
    base = Path(base_dir)
    known = {"models", "methods", "attacks", "params", "data", "limit", "run", "baseline", "clean_data"}
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
    clean_n, max_drop = overrides.pop("clean_n", None), overrides.pop("max_acc_drop", None)
    clean_cli = overrides.pop("clean_data", None)

    def cli_clean(c: CleanSpec | None) -> CleanSpec | None:  # --clean-n / --max-acc-drop over every clean set
        if c is None:
            return None
        if clean_n is not None:
            if clean_n < 1:
                raise OnnxclpError(f"--clean-n must be >= 1, got {clean_n}")
            c = replace(c, n=int(clean_n))
        if max_drop is not None:
            if max_drop < 0:
                raise OnnxclpError(f"--max-acc-drop must be >= 0, got {max_drop:g}")
            c = replace(c, max_acc_drop=float(max_drop))
        return c

    clean = _clean(config.get("clean_data"), base, "clean_data")
    if clean_cli is not None:  # the command line's path (from the current folder), the config's other settings
        clean = replace(clean or CleanSpec("", ""), label=str(clean_cli), path=str(clean_cli))
    clean = cli_clean(clean)
    models = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            models.append(ModelSpec(m, _path(m, base, f"models[{i}]")))
            continue
        if not isinstance(m, Mapping) or "path" not in m:
            raise OnnxclpError(f"grid config: models[{i}] must be a path or a mapping with 'path'")
        bad_keys = sorted(set(m) - {"path", "label", "attacks", "clean_data"})
        if bad_keys:
            raise OnnxclpError(f"grid config: models[{i}]: unknown key(s) {', '.join(bad_keys)}")
        own_clean = "clean_data" in m
        model_clean = cli_clean(_clean(m.get("clean_data"), base, f"models[{i}].clean_data")) if own_clean else None
        own = m.get("attacks")
        if isinstance(own, str | Mapping):
            own = [own]
        own_specs = (
            None if own is None else tuple(_attack(a, base, f"models[{i}].attacks[{j}]") for j, a in enumerate(own))
        )
        models.append(
            ModelSpec(
                str(m.get("label") or m["path"]),
                _path(m["path"], base, f"models[{i}].path"),
                own_specs,
                model_clean,
                own_clean,
            )
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
    return GridSpec(models, methods, attacks, data, options, baseline, str(data_label), clean)


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
        drop = Drop(guard["acc_before"], guard["acc_after"], guard["drop"], guard["se"] or 0.0, guard["n_val"], 0)
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
