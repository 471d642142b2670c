"""Every option the commands share, declared once: the method options built from the registry
(:func:`with_method_options`), the input options of the commands that run a model for a method or a detector
(:func:`with_model_input`: ``sanitize`` and ``scan``), the options of the commands that run a model over a data
set (:func:`with_run_options`: ``evaluate``, ``compare``, ``sweep``, ``tac``), and the small shared ones
(``--debug``, ``--quiet``, ``--workers``, ``--ray``...).

Nothing heavy is imported here; the ``--attack`` choices are the modules of the attack registry
(:mod:`onnxclp.eval.attacks`), listed without importing them.
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
from typing import TYPE_CHECKING, Annotated, Any

import typer

from onnxclp.cli.common import require_extra
from onnxclp.errors import OnnxclpError
from onnxclp.parsing import numbers, parse_numbers

if TYPE_CHECKING:
    from onnxclp.eval.options import RunOptions

METHOD_PANEL = "Method"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ReportFormat(str, Enum):
    """``sanitize --report-format``: the formats a report file can take (text is the terminal's)."""

    json = "json"
    sarif = "sarif"


Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="List every layer, even on large models.")]
DeviceOpt = Annotated[
    Device,
    typer.Option("--device", case_sensitive=False, help="auto (CUDA when onnxruntime has it), cpu or cuda."),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", help="Regex on layer or weight names to leave alone (repeatable).", rich_help_panel=METHOD_PANEL
    ),
]
Streams = Annotated[
    str,
    typer.Option(
        "--streams",
        metavar="RULE",
        help="Residual-stream rule: strongest (a channel summed into one stream is pruned in its most outlying "
        "layer only) or all (every layer decides alone).",
        rich_help_panel=METHOD_PANEL,
    ),
]
InlineFunctions = Annotated[
    bool,
    typer.Option(
        "--inline-functions",
        help="Inline model-local functions first so the layers inside them are scored.",
        rich_help_panel=METHOD_PANEL,
    ),
]


def _method_help() -> str:
    from onnxclp import methods

    return f"Defence: {', '.join(methods.names())}; `onnxclp methods` describes each and what it needs."


def method_option(default: str = "clp") -> inspect.Parameter:
    """``--method/-m``, its help listing every registered method."""
    return inspect.Parameter(
        "method",
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[
            str,
            typer.Option("--method", "-m", metavar="NAME", help=_method_help(), rich_help_panel=METHOD_PANEL),
        ],
    )


def method_parameters(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One CLI option per parameter any registered method declares (``--u``, ``--u-low``...), plus ``--score``
    and ``--include-fc``; each help names the methods that take it and their defaults."""
    from onnxclp import methods, scoring

    out = []
    for name, spec in methods.all_params().items():
        if name in exclude:
            continue
        takers = [m for m in methods.names() if methods.get(m).spec(name) is not None]
        defaults = ", ".join(f"{m} {methods.get(m).spec(name).default}" for m in takers)  # type: ignore[union-attr]
        defaults = (
            f"(default: {defaults})"
            if len(takers) > 1
            else f"({takers[0]} only; default {methods.get(takers[0]).spec(name).default})"
        )  # type: ignore[union-attr]
        decls = [spec.flag] + ([spec.short] if spec.short else [])
        out.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    spec.type | None,
                    typer.Option(*decls, help=f"{spec.help} {defaults}", rich_help_panel=METHOD_PANEL),
                ],
            )
        )
    score_help = "Channel score: " + ", ".join(scoring.names()) + " (default: the method's)."
    out.append(
        inspect.Parameter(
            "score",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option("--score", help=score_help, rich_help_panel=METHOD_PANEL)],
        )
    )
    out.append(
        inspect.Parameter(
            "include_fc",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                bool | None,
                typer.Option(
                    "--include-fc/--no-include-fc",
                    help="Score hidden fully connected layers (default: the method's).",
                    rich_help_panel=METHOD_PANEL,
                ),
            ],
        )
    )
    return out


def with_method_options(*, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add ``--method`` and every registry parameter to a command. The command receives them in a
    ``method_values`` dict (only the options given, None left out) beside ``method``, ``score``, ``include_fc``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        from onnxclp import methods

        names = [n for n in methods.all_params() if n not in skip]
        sig = inspect.signature(fn, eval_str=True)
        replaced = {"method_values", "method", "score", "include_fc"}  # built from the registry below
        own = [p for p in sig.parameters.values() if p.name not in replaced]
        added = [method_option(), *method_parameters(skip)]
        params = sorted([*own, *added], key=lambda p: p.default is not inspect.Parameter.empty)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return fn(method_values={k: v for k, v in values.items() if v is not None}, **kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command

    return wrap


# --------------------------------------------------------------------------------------------------------------
# running a model for a method or a detector: sanitize and scan

MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", metavar="R,G,B", help="Input normalisation mean (images in [0,1] -> model input)."),
]
StdOpt = Annotated[str | None, typer.Option("--std", metavar="R,G,B", help="Input normalisation std (with --mean).")]
InputShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", metavar="C,H,W", help="One input image's shape when the graph has none.")
]


@dataclass(frozen=True)
class ModelInput:
    """``--mean``, ``--std``, ``--input-shape`` and ``--device`` as typed on the command line."""

    mean: str | None = None
    std: str | None = None
    input_shape: str | None = None
    device: Device = Device.auto

    def context(self) -> dict[str, Any]:
        """What methods and detectors that run the model read (``Options.context``)."""
        return model_context(self.mean, self.std, self.input_shape, self.device)


#: The placeholder default of a command's ``model_input`` parameter (:func:`with_model_input` replaces it).
MODEL_INPUT = ModelInput()


def model_context(mean: str | None, std: str | None, input_shape: str | None, device: Device) -> dict[str, Any]:
    """What methods and detectors that run the model read (``Options.context``)."""
    shape = parse_numbers(input_shape, "--input-shape")
    return {
        "mean": parse_numbers(mean, "--mean"),
        "std": parse_numbers(std, "--std"),
        "input_shape": None if shape is None else [int(x) for x in shape],
        "device": device.value,
    }


_MODEL_INPUT: list[tuple[str, Any, Any]] = [
    ("mean", MeanOpt, None),
    ("std", StdOpt, None),
    ("input_shape", InputShapeOpt, None),
    ("device", DeviceOpt, Device.auto),
]


def with_model_input(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: the command's ``model_input: ModelInput`` parameter becomes the options ``--mean``, ``--std``,
    ``--input-shape`` and ``--device``, at its place in the signature (so ``--help`` lists them there); the
    command receives them as one :class:`ModelInput`."""
    sig = inspect.signature(fn, eval_str=True)
    params: list[inspect.Parameter] = []
    for p in sig.parameters.values():
        if p.name == "model_input":
            params += [
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                for name, annotation, default in _MODEL_INPUT
            ]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [name for name, _, _ in _MODEL_INPUT]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        return fn(model_input=ModelInput(**{n: kwargs.pop(n) for n in names}), **kwargs)

    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return command


# --------------------------------------------------------------------------------------------------------------
# parallel runs: scan, grid, sweep

WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", help="Cells run in parallel, in processes (default: cores, capped by memory)."),
]
RayOpt = Annotated[
    str | None, typer.Option("--ray", help="Run the cells on Ray: 'local', 'auto' (RAY_ADDRESS) or an address.")
]


# --------------------------------------------------------------------------------------------------------------
# running a model over a data set: evaluate, compare, sweep, tac

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
            values = numbers(text, "--position", int)
            if len(values) != 2:
                raise OnnxclpError(f"--position: expected a corner name or ROW,COL, got {text!r}")
            return values
        return text
    if option == "patch_size":
        values = numbers(text, "--patch-size", int)
        if len(values) not in (1, 2):
            raise OnnxclpError(f"--patch-size: expected N or H,W, got {text!r}")
        return values[0] if len(values) == 1 else values
    if option == "value":
        values = numbers(text, "--value", float)
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
RunMeanOpt = Annotated[
    str | None,
    typer.Option(
        "--mean",
        metavar="R,G,B",
        help="Normalisation mean R,G,B, applied after the trigger.",
        rich_help_panel=DATA_PANEL,
    ),
]
RunStdOpt = Annotated[
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
RunDeviceOpt = Annotated[
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
            size = numbers(v["input_size"], "--input-size", int)
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
    ("mean", RunMeanOpt, None),
    ("std", RunStdOpt, None),
    ("layout", LayoutOpt, None),
    ("input_size", InputSizeOpt, None),
    ("x_key", XKeyOpt, None),
    ("y_key", YKeyOpt, None),
    ("limit", LimitOpt, None),
    ("batch_size", BatchOpt, 256),
    ("device", RunDeviceOpt, Device.auto),
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
