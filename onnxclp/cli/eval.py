"""The ``evaluate`` and ``compare`` commands, added to the main Typer app by :func:`register`, and the options
every command that runs a model shares (:func:`with_run_options`: also ``sweep`` and ``tac``).

This module imports nothing heavy at load time (no torch, onnxruntime, PIL or matplotlib): the commands check
the ``eval`` extra (one line naming it, exit 2, when it is missing) and import :mod:`onnxclp.eval` when they
run, so ``onnxclp sanitize`` starts as fast as before. The ``--attack`` choices are the modules of the attack
registry (:mod:`onnxclp.eval.attacks`), listed without importing them.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, a traceback only with
``--debug``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from onnxclp.cli.common import Device, check_writable, require_extra, run_guarded, write_text
from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    from onnxclp.eval.options import RunOptions

__all__ = ["RunArgs", "compare_command", "evaluate_command", "parse_numbers", "register", "with_run_options"]

T = TypeVar("T")

ATTACK_PANEL = "Attack"
DATA_PANEL = "Data and model input"
RUN_PANEL = "Run and output"


def attack_names() -> list[str]:
    """The attacks of the registry, by module name (``none`` first), without importing torch: one module per
    attack in :mod:`onnxclp.eval.attacks`, named as the attack."""
    spec = importlib.util.find_spec("onnxclp.eval.attacks")
    paths = list(spec.submodule_search_locations or []) if spec else []
    found = sorted(m.name for m in pkgutil.iter_modules(paths) if m.name != "base" and not m.name.startswith("_"))
    return sorted(found, key=lambda n: n != "none")


AttackName = Enum("AttackName", {n: n for n in attack_names()}, type=str)  # type: ignore[misc]


class Mode(str, Enum):
    a2o = "a2o"
    a2a = "a2a"


class Layout(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"


class GridKind(str, Enum):
    field = "field"
    noise = "noise"
    sampling = "sampling"


# Which attack parameter each trigger option sets, per attack (docs/algorithms.md, "Attacks").
OPTION_PARAMS: dict[str, dict[str, str]] = {
    "patch_size": {"badnets": "size", "patch": "size"},
    "position": {"badnets": "position", "patch": "position"},
    "value": {"badnets": "value"},
    "trigger_image": {"badnets": "image", "blended": "image", "patch": "image"},
    "mask": {"patch": "mask"},
    "opacity": {"patch": "opacity"},
    "alpha": {"blended": "alpha"},
    "delta": {"sig": "delta"},
    "frequency": {"sig": "frequency"},
    "k": {"wanet": "k"},
    "s": {"wanet": "s"},
    "grid_rescale": {"wanet": "grid_rescale"},
    "grid": {"wanet": "grid"},
    "grid_kind": {"wanet": "grid_kind"},
    "levels": {"bpp": "levels"},
}


# --------------------------------------------------------------------------------------------------------------
# option values


def _numbers(text: str, what: str, cast: Callable[[str], T]) -> list[T]:
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OnnxclpError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def parse_numbers(text: str | None, what: str) -> list[float] | None:
    """``R,G,B``-style option text as floats (None stays None)."""
    return None if text is None else _numbers(text, what, float)


def _fraction(text: str) -> float:
    """A number or a fraction such as ``40/255``."""
    if "/" in text:
        num, _, den = text.partition("/")
        value = float(num) / float(den)
    else:
        value = float(text)
    return value


def _trigger_value(option: str, text: str) -> Any:
    """Parse a trigger option's text into the attack parameter's JSON value."""
    if option == "position":
        if "," in text:
            values = _numbers(text, "--position", int)
            if len(values) != 2:
                raise OnnxclpError(f"--position: expected a corner name or ROW,COL, got {text!r}")
            return values
        return text
    if option == "patch_size":
        values = _numbers(text, "--patch-size", int)
        if len(values) not in (1, 2):
            raise OnnxclpError(f"--patch-size: expected N or H,W, got {text!r}")
        return values[0] if len(values) == 1 else values
    if option == "value":
        values = _numbers(text, "--value", float)
        return values[0] if len(values) == 1 else values
    if option == "delta":
        try:
            return _fraction(text)
        except (ValueError, ZeroDivisionError):
            raise OnnxclpError(f"--delta: expected a number or a fraction like 40/255, got {text!r}") from None
    return text


def _param_pairs(pairs: list[str] | None) -> dict[str, Any]:
    """``--param KEY=VALUE`` (repeatable); VALUE is read as JSON when it parses, else as a string."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise OnnxclpError(f"--param: expected KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _attack_params(name: str, options: dict[str, Any], pairs: list[str] | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for option, value in options.items():
        if value is None:
            continue
        flag = "--" + option.replace("_", "-")
        key = OPTION_PARAMS[option].get(name)
        if key is None:
            users = ", ".join(OPTION_PARAMS[option])
            raise OnnxclpError(f"{flag} does not apply to the {name} attack (it is for: {users})")
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, str):
            value = _trigger_value(option, value)
        params[key] = value
    params.update(_param_pairs(pairs))
    return params


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:6.2f}%"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f} pt"


def _write_json(target: str, payload: dict[str, Any]) -> None:
    write_text(target, json.dumps(payload, indent=2) + "\n", "results")


def _attack_line(attack: dict[str, Any]) -> str:
    name = attack["attack"]
    if name == "none":
        return "none (no trigger: ASR and RA not measured; --attack NAME or --attack-config to measure them)"
    to = f"target {attack['target']}" if attack["mode"] == "a2o" else "y → y+1"
    return f"{name} {attack['mode']} {to}, seed {attack['seed']}  {json.dumps(attack['params'])}"


def _norm_line(attack: dict[str, Any], source: str | None = None) -> str:
    norm = attack.get("normalize")
    if not norm:
        return "none: the model is fed [0, 1] pixels (give --mean/--std if it was trained on normalised images)"
    text = f"mean {','.join(f'{v:g}' for v in norm['mean'])}  std {','.join(f'{v:g}' for v in norm['std'])}"
    return text + (f"  (from {source})" if source and source != "--mean/--std" else "")


def chance_warning(acc: float | None, num_classes: int, attack: dict[str, Any], what: str = "the model") -> str | None:
    """A warning when a model fed raw [0, 1] pixels (no --mean/--std, none recorded) scores near chance
    (ACC <= 1.5 / classes): the usual cause is a model trained on normalised images."""
    if acc is None or attack.get("normalize") or num_classes < 2 or acc > 1.5 / num_classes:
        return None
    return (
        f"warning: {what} scores {100 * acc:.1f}% ACC, near chance for {num_classes} classes "
        f"({100 / num_classes:.1f}%), and was fed raw [0, 1] pixels: if it was trained on normalised images, give "
        "--mean/--std (CIFAR-10: --mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616; ImageNet: --mean "
        "0.485,0.456,0.406 --std 0.229,0.224,0.225)"
    )


# --------------------------------------------------------------------------------------------------------------
# option types

DataOpt = Annotated[
    Path,
    typer.Option(
        "--data",
        help="Labelled images: .npz (x_test/y_test), an ImageFolder directory, or cifar-10-batches-py.",
        rich_help_panel=DATA_PANEL,
    ),
]
XKeyOpt = Annotated[
    str | None, typer.Option("--x-key", help="Images key of an .npz (default x_test).", rich_help_panel=DATA_PANEL)
]
YKeyOpt = Annotated[
    str | None, typer.Option("--y-key", help="Labels key of an .npz (default y_test).", rich_help_panel=DATA_PANEL)
]
MeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean",
        metavar="R,G,B",
        help="Normalisation mean R,G,B, applied after the trigger.",
        rich_help_panel=DATA_PANEL,
    ),
]
StdOpt = Annotated[
    str | None,
    typer.Option("--std", metavar="R,G,B", help="Normalisation std R,G,B (with --mean).", rich_help_panel=DATA_PANEL),
]
LayoutOpt = Annotated[
    Layout | None,
    typer.Option("--layout", help="Model input layout (default: read from the model).", rich_help_panel=DATA_PANEL),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-size", metavar="H,W", help="H,W: resize images to this size (bilinear).", rich_help_panel=DATA_PANEL
    ),
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", help="Evaluate N samples drawn with --seed.", min=1, rich_help_panel=DATA_PANEL),
]

AttackOpt = Annotated[
    AttackName | None,
    typer.Option(
        "--attack",
        metavar="NAME",
        help=f"Trigger: {', '.join(attack_names())} (default: the config's, else none; docs/evaluate.md).",
        rich_help_panel=ATTACK_PANEL,
    ),
]
AttackConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--attack-config", help="Attack configuration JSON (as the zoo trainer writes).", rich_help_panel=ATTACK_PANEL
    ),
]
TargetOpt = Annotated[
    int | None, typer.Option("--target", help="Target class for a2o (default 0).", rich_help_panel=ATTACK_PANEL)
]
ModeOpt = Annotated[
    Mode | None, typer.Option("--mode", help="a2o (default) or a2a: y → (y+1) mod C.", rich_help_panel=ATTACK_PANEL)
]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed", help="Seed of random patterns/grids and of --limit (default 0).", rich_help_panel=ATTACK_PANEL
    ),
]
PatchSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--patch-size", metavar="N|H,W", help="badnets: N (square); patch: H,W.", rich_help_panel=ATTACK_PANEL
    ),
]
PositionOpt = Annotated[
    str | None,
    typer.Option(
        "--position",
        metavar="CORNER|ROW,COL",
        help="badnets/patch: bottom-right, bottom-left, top-right, top-left, or ROW,COL (negative: from the end).",
        rich_help_panel=ATTACK_PANEL,
    ),
]
ValueOpt = Annotated[
    str | None,
    typer.Option(
        "--value", metavar="V|R,G,B", help="badnets: patch value in [0, 1], or R,G,B.", rich_help_panel=ATTACK_PANEL
    ),
]
TriggerImageOpt = Annotated[
    Path | None,
    typer.Option(
        "--trigger-image",
        help="badnets patch / blended pattern / patch image: an image file or a .npy array ((h, w), (h, w, C) or "
        "(C, h, w); uint8 or float in [0, 1]).",
        rich_help_panel=ATTACK_PANEL,
    ),
]
MaskOpt = Annotated[
    Path | None,
    typer.Option("--mask", help="patch: grey-level mask image (or .npy array).", rich_help_panel=ATTACK_PANEL),
]
OpacityOpt = Annotated[
    float | None, typer.Option("--opacity", help="patch: mask multiplier in [0, 1].", rich_help_panel=ATTACK_PANEL)
]
AlphaOpt = Annotated[
    float | None, typer.Option("--alpha", help="blended: blend ratio (default 0.2).", rich_help_panel=ATTACK_PANEL)
]
DeltaOpt = Annotated[
    str | None,
    typer.Option(
        "--delta", metavar="X|A/B", help="sig: amplitude, a number or 40/255 (default).", rich_help_panel=ATTACK_PANEL
    ),
]
FrequencyOpt = Annotated[
    float | None, typer.Option("--frequency", help="sig: frequency f (default 6).", rich_help_panel=ATTACK_PANEL)
]
KOpt = Annotated[int | None, typer.Option("--k", help="wanet: field size k (default 4).", rich_help_panel=ATTACK_PANEL)]
SOpt = Annotated[
    float | None, typer.Option("--s", help="wanet: warp strength s (default 0.5).", rich_help_panel=ATTACK_PANEL)
]
GridRescaleOpt = Annotated[
    float | None, typer.Option("--grid-rescale", help="wanet: grid rescale (default 1).", rich_help_panel=ATTACK_PANEL)
]
GridOpt = Annotated[
    Path | None,
    typer.Option(
        "--grid",
        help="wanet: a saved .npy of the kind --grid-kind says (else the field is drawn from --seed).",
        rich_help_panel=ATTACK_PANEL,
    ),
]
GridKindOpt = Annotated[
    GridKind | None,
    typer.Option(
        "--grid-kind",
        help="wanet: what --grid holds: field (2, k, k); noise (BackdoorBench's upsampled noise_grid, H, W, 2); "
        "sampling (the grid handed to grid_sample, H, W, 2). Default: read from the array when evident, else "
        "refused.",
        rich_help_panel=ATTACK_PANEL,
    ),
]
LevelsOpt = Annotated[
    int | None, typer.Option("--levels", help="bpp: levels per channel (default 8).", rich_help_panel=ATTACK_PANEL)
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        metavar="KEY=JSON",
        help="Any attack parameter, KEY=JSON (repeatable).",
        rich_help_panel=ATTACK_PANEL,
    ),
]

BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Images per onnxruntime call.", rich_help_panel=RUN_PANEL)
]
DeviceOpt = Annotated[
    Device,
    typer.Option(
        "--device",
        case_sensitive=False,
        help="auto: CUDA when onnxruntime has it, else CPU; cuda needs the 'eval-gpu' extra.",
        rich_help_panel=RUN_PANEL,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", min=1, help="onnxruntime intra-op threads (default: all cores).", rich_help_panel=RUN_PANEL
    ),
]
ProgressOpt = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress", help="Progress bar on stderr (only on a terminal).", rich_help_panel=RUN_PANEL
    ),
]


# --------------------------------------------------------------------------------------------------------------
# the options every command that runs a model shares


@dataclass
class RunArgs:
    """The shared options as typed on the command line; :meth:`options` turns them into a
    :class:`~onnxclp.eval.options.RunOptions` (after checking the ``eval`` extra: reading an attack
    configuration needs torch)."""

    data: Path
    values: dict[str, Any]

    def options(self, **overrides: Any) -> RunOptions:
        """The :class:`RunOptions` of these values (``overrides`` win); raises OnnxclpError for bad input."""
        require_extra("eval", "onnxruntime", "torch", "PIL")
        from onnxclp.eval.attacks import load_attack_config
        from onnxclp.eval.options import RunOptions

        v = self.values
        attack, attack_config = v["attack"], v["attack_config"]
        name = attack.value if attack is not None else None
        if name is None:
            name = load_attack_config(attack_config).attack if attack_config is not None else "none"
        trigger = {k: v[k] for k in OPTION_PARAMS}
        size = None
        if v["input_size"] is not None:
            size = _numbers(v["input_size"], "--input-size", int)
            if len(size) != 2:
                raise OnnxclpError(f"--input-size: expected H,W, got {v['input_size']!r}")
        fields = {
            "attack": name,
            "params": _attack_params(name, trigger, v["param"]),
            "attack_config": attack_config,
            "target": v["target"],
            "mode": None if v["mode"] is None else v["mode"].value,
            "seed": v["seed"],
            "mean": parse_numbers(v["mean"], "--mean"),
            "std": parse_numbers(v["std"], "--std"),
            "layout": None if v["layout"] is None else v["layout"].value,
            "input_size": size,
            "limit": v["limit"],
            "batch_size": v["batch_size"],
            "device": v["device"],
            "threads": v["threads"],
            "x_key": v["x_key"],
            "y_key": v["y_key"],
            "progress": v["progress"],
        }
        return RunOptions(**{**fields, **overrides})


_RUN_OPTIONS: list[tuple[str, Any, Any]] = [
    ("data", DataOpt, inspect.Parameter.empty),
    ("attack", AttackOpt, None),
    ("attack_config", AttackConfigOpt, None),
    ("target", TargetOpt, None),
    ("mode", ModeOpt, None),
    ("seed", SeedOpt, None),
    ("patch_size", PatchSizeOpt, None),
    ("position", PositionOpt, None),
    ("value", ValueOpt, None),
    ("trigger_image", TriggerImageOpt, None),
    ("mask", MaskOpt, None),
    ("opacity", OpacityOpt, None),
    ("alpha", AlphaOpt, None),
    ("delta", DeltaOpt, None),
    ("frequency", FrequencyOpt, None),
    ("k", KOpt, None),
    ("s", SOpt, None),
    ("grid_rescale", GridRescaleOpt, None),
    ("grid", GridOpt, None),
    ("grid_kind", GridKindOpt, None),
    ("levels", LevelsOpt, None),
    ("param", ParamOpt, None),
    ("mean", MeanOpt, None),
    ("std", StdOpt, None),
    ("layout", LayoutOpt, None),
    ("input_size", InputSizeOpt, None),
    ("x_key", XKeyOpt, None),
    ("y_key", YKeyOpt, None),
    ("limit", LimitOpt, None),
    ("batch_size", BatchOpt, 256),
    ("device", DeviceOpt, Device.auto),
    ("threads", ThreadsOpt, None),
    ("progress", ProgressOpt, True),
]


def with_run_options(*, batch_size: int = 256) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add the options every command that runs a model shares (``--data``, the attack and trigger
    options, the data and input options, ``--batch-size``, ``--device``, ``--threads``, ``--progress``) to a
    command, built once here. The command receives them as ``run``, a :class:`RunArgs`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "run"]
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=batch_size if name == "batch_size" else default,
                annotation=annotation,
            )
            for name, annotation, default in _RUN_OPTIONS
        ]
        params = sorted([*own, *added], key=lambda p: p.default is not inspect.Parameter.empty)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
        names = [name for name, _, _ in _RUN_OPTIONS]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return fn(run=RunArgs(values.pop("data"), values), **kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command

    return wrap


JsonOpt = Annotated[
    str | None,
    typer.Option(
        "--json", metavar="PATH|-", help="Write the results as JSON to PATH ('-': stdout).", rich_help_panel=RUN_PANEL
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=RUN_PANEL)]
SaveExamplesOpt = Annotated[
    Path | None,
    typer.Option("--save-examples", help="Write a PNG grid of clean/triggered images here.", rich_help_panel=RUN_PANEL),
]


# --------------------------------------------------------------------------------------------------------------
# commands


@with_run_options()
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="ONNX classifier.", show_default=False)],
    run: RunArgs,
    save_examples: SaveExamplesOpt = None,
    json_path: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Clean accuracy (ACC), attack success rate (ASR) and robust accuracy (RA) of an ONNX classifier."""

    def body() -> None:
        check_writable(json_path, "JSON results")
        options = run.options()
        from onnxclp.eval.api import evaluate
        from onnxclp.eval.runner import describe_input

        result = evaluate(model, run.data, options=options, save_examples=save_examples)
        if json_path is not None:
            _write_json(json_path, result.to_dict())
            if json_path == "-":
                return
        m = result.metrics
        triggered = result.attack["attack"] != "none"  # no trigger: nothing to succeed, no ASR or RA line
        lines = [
            ("model", result.model),
            ("provider", f"{result.provider}  ({describe_input(result.input)}; {result.num_classes} classes)"),
            ("data", f"{result.data}: {result.n_samples} samples"),
            ("attack", _attack_line(result.attack)),
            ("normalize", _norm_line(result.attack, result.normalize_source)),
            ("ACC", f"{_pct(m.acc)}  {m.clean_correct} / {result.n_samples}"),
            *(
                [
                    ("ASR", f"{_pct(m.asr)}  {m.attack_hits} / {result.n_attacked}"),
                    ("RA", f"{_pct(m.ra)}  {m.attack_robust} / {result.n_attacked}"),
                ]
                if triggered
                else []
            ),
            (
                "throughput",
                f"{result.images_per_second:.0f} images/s  ({result.images} images in {result.seconds:.2f} s; "
                f"{result.total_seconds:.2f} s in all)",
            ),
        ]
        if result.examples:
            lines.append(("examples", result.examples))
        for key, text in lines:
            typer.echo(f"{key:<11} {text}")
        warning = chance_warning(m.acc, result.num_classes, result.attack)
        if warning:
            typer.echo(warning, err=True)

    run_guarded(body, debug)


@with_run_options()
def compare_command(
    original: Annotated[Path, typer.Argument(help="The original ONNX model.", show_default=False)],
    sanitized: Annotated[Path, typer.Argument(help="The sanitized ONNX model.", show_default=False)],
    run: RunArgs,
    json_path: JsonOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Both models on the same attack set: ACC, ASR, RA, their differences and prediction agreement."""

    def body() -> None:
        check_writable(json_path, "JSON results")
        options = run.options()
        from onnxclp.eval.api import compare
        from onnxclp.eval.runner import describe_input

        result = compare(original, sanitized, run.data, options=options)
        if json_path is not None:
            _write_json(json_path, result.to_dict())
            if json_path == "-":
                return
        o, s_ = result.original_metrics, result.sanitized_metrics
        typer.echo(f"{'original':<11} {result.original}")
        typer.echo(f"{'sanitized':<11} {result.sanitized}")
        typer.echo(
            f"{'provider':<11} {result.provider}  ({describe_input(result.input)}; {result.num_classes} classes)"
        )
        typer.echo(f"{'data':<11} {result.data}: {result.n_samples} samples, {result.n_attacked} attacked")
        typer.echo(f"{'attack':<11} {_attack_line(result.attack)}")
        typer.echo(f"{'normalize':<11} {_norm_line(result.attack, result.normalize_source)}")
        typer.echo(f"{'':<11} {'original':>10} {'sanitized':>10} {'change':>11}")
        triggered = result.attack["attack"] != "none"  # no trigger: no ASR or RA row
        for name in ("acc", "asr", "ra") if triggered else ("acc",):
            a, b = getattr(o, name), getattr(s_, name)
            typer.echo(f"{name.upper():<11} {_pct(a):>10} {_pct(b):>10} {_pts(result.deltas[name]):>11}")
        typer.echo(
            f"{'agreement':<11} {_pct(result.agreement).strip()} of clean predictions"
            + (f", {_pct(result.triggered_agreement).strip()} of triggered ones" if triggered else "")
        )
        typer.echo(
            f"{'throughput':<11} {result.images_per_second:.0f} images/s  ({result.images} images in "
            f"{result.seconds:.2f} s; {result.total_seconds:.2f} s in all)"
        )
        for what, metrics in (("the original model", o), ("the sanitized model", s_)):
            warning = chance_warning(metrics.acc, result.num_classes, result.attack, what)
            if warning:
                typer.echo(warning, err=True)
                break

    run_guarded(body, debug)


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` and ``compare`` commands to ``app``."""
    app.command("evaluate")(evaluate_command)
    app.command("compare")(compare_command)
