"""The grid's config (docs/scale.md, "Grid"): the spec dataclasses, reading a JSON or YAML file
(:func:`load_config`), checking it into a :class:`GridSpec` (:func:`parse_config`) and listing its cells in a
stable order (:func:`expand`: model, then attack, then the baseline and each method's settings). Running the
cells is :mod:`onnxclp.study.grid`, which re-exports these names.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnxclp.errors import OnnxclpError
from onnxclp.eval.options import RunOptions

PathLike = str | os.PathLike[str]

#: Keys of an attack entry: the RunOptions fields an attack sets (``config`` is ``attack_config``).
ATTACK_KEYS = ("config", "attack", "params", "target", "mode", "seed", "mean", "std")
#: Keys of the config's ``run`` section: RunOptions fields shared by every cell.
RUN_KEYS = ("batch_size", "device", "threads", "mean", "std", "layout", "input_size", "x_key", "y_key")
#: Keys of a ``clean_data`` entry (a path alone is ``{"path": ...}``).
CLEAN_KEYS = ("path", "n", "x_key", "y_key", "val_fraction", "select_fraction", "max_acc_drop", "mean", "std",
              "force")  # fmt: skip
#: Parameters every method takes besides its registry parameters.
COMMON_PARAMS = ("score", "include_fc")


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
    ``sanitize --clean-n/--x-key/--y-key/--val-fraction/--select-fraction/--max-acc-drop/--mean/--std`` settings
    (None: the defaults; ``mean``/``std`` None: the attack's normalisation). ``force``: a result over the budget is
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
    select_fraction: float | None = None


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
    for key in ("val_fraction", "select_fraction", "max_acc_drop"):
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
        numbers["val_fraction"], numbers["max_acc_drop"], mean, std, force, numbers["select_fraction"],
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
