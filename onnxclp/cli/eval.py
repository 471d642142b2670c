"""The ``evaluate`` and ``compare`` commands, added to the main Typer app by :func:`register`.

This module imports nothing heavy at load time (no torch, onnxruntime, PIL or matplotlib): the commands
import :mod:`onnxclp.eval.api` when they run, so ``onnxclp sanitize`` starts as fast as before.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, a traceback only with
``--debug``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from onnxclp.cli.common import Device, require_extra, run_guarded
from onnxclp.errors import OnnxclpError

__all__ = ["compare_command", "evaluate_command", "parse_numbers", "register"]

T = TypeVar("T")

ATTACK_PANEL = "Attack"
DATA_PANEL = "Data and model input"
RUN_PANEL = "Run and output"


class AttackName(str, Enum):
    none = "none"
    badnets = "badnets"
    blended = "blended"
    sig = "sig"
    wanet = "wanet"
    bpp = "bpp"
    patch = "patch"


class Mode(str, Enum):
    a2o = "a2o"
    a2a = "a2a"


class Layout(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"


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
        if isinstance(value, Path):
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
    text = json.dumps(payload, indent=2) + "\n"
    if target == "-":
        sys.stdout.write(text)
        return
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OnnxclpError(f"cannot write {target}: {exc.strerror or exc}") from exc


def _attack_line(attack: dict[str, Any]) -> str:
    name = attack["attack"]
    if name == "none":
        return "none (ASR/RA: clean images of the attacked subset)"
    to = f"target {attack['target']}" if attack["mode"] == "a2o" else "y → y+1"
    return f"{name} {attack['mode']} {to}, seed {attack['seed']}  {json.dumps(attack['params'])}"


def _norm_line(attack: dict[str, Any]) -> str:
    norm = attack.get("normalize")
    if not norm:
        return "none (model fed [0, 1] pixels)"
    return f"mean {','.join(f'{v:g}' for v in norm['mean'])}  std {','.join(f'{v:g}' for v in norm['std'])}"


# --------------------------------------------------------------------------------------------------------------
# shared options

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
    typer.Option("--attack", help="Trigger (default: the config's, else none).", rich_help_panel=ATTACK_PANEL),
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
        "--trigger-image", help="badnets patch / blended pattern / patch image file.", rich_help_panel=ATTACK_PANEL
    ),
]
MaskOpt = Annotated[
    Path | None, typer.Option("--mask", help="patch: grey-level mask image.", rich_help_panel=ATTACK_PANEL)
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
    typer.Option("--grid", help="wanet: saved field/grid .npy (else drawn from --seed).", rich_help_panel=ATTACK_PANEL),
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
        help="auto: CUDA when onnxruntime has it, else CPU.",
        rich_help_panel=RUN_PANEL,
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", min=1, help="onnxruntime intra-op threads (default: all cores).", rich_help_panel=RUN_PANEL
    ),
]
JsonOpt = Annotated[
    str | None,
    typer.Option(
        "--json", metavar="PATH|-", help="Write the results as JSON to PATH ('-': stdout).", rich_help_panel=RUN_PANEL
    ),
]
ProgressOpt = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress", help="Progress bar on stderr (only on a terminal).", rich_help_panel=RUN_PANEL
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.", rich_help_panel=RUN_PANEL)]


def _common(
    attack: AttackName | None,
    attack_config: Path | None,
    mean: str | None,
    std: str | None,
    input_size: str | None,
    trigger_options: dict[str, Any],
    params: list[str] | None,
) -> dict[str, Any]:
    """Keyword arguments shared by api.evaluate and api.compare, parsed from the options."""
    from onnxclp.eval.attacks import load_attack_config

    name = attack.value if attack is not None else None
    if name is None:
        name = load_attack_config(attack_config).attack if attack_config is not None else "none"
    size = None
    if input_size is not None:
        size = _numbers(input_size, "--input-size", int)
        if len(size) != 2:
            raise OnnxclpError(f"--input-size: expected H,W, got {input_size!r}")
    return {
        "attack": name,
        "params": _attack_params(name, trigger_options, params),
        "attack_config": attack_config,
        "mean": None if mean is None else _numbers(mean, "--mean", float),
        "std": None if std is None else _numbers(std, "--std", float),
        "input_size": size,
    }


# --------------------------------------------------------------------------------------------------------------
# commands


def evaluate_command(
    model: Annotated[Path, typer.Argument(help="ONNX classifier.", show_default=False)],
    data: DataOpt,
    attack: AttackOpt = None,
    attack_config: AttackConfigOpt = None,
    target: TargetOpt = None,
    mode: ModeOpt = None,
    seed: SeedOpt = None,
    patch_size: PatchSizeOpt = None,
    position: PositionOpt = None,
    value: ValueOpt = None,
    trigger_image: TriggerImageOpt = None,
    mask: MaskOpt = None,
    opacity: OpacityOpt = None,
    alpha: AlphaOpt = None,
    delta: DeltaOpt = None,
    frequency: FrequencyOpt = None,
    k: KOpt = None,
    s: SOpt = None,
    grid_rescale: GridRescaleOpt = None,
    grid: GridOpt = None,
    levels: LevelsOpt = None,
    param: ParamOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = None,
    input_size: InputSizeOpt = None,
    x_key: XKeyOpt = None,
    y_key: YKeyOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    save_examples: Annotated[
        Path | None,
        typer.Option(
            "--save-examples", help="Write a PNG grid of clean/triggered images here.", rich_help_panel=RUN_PANEL
        ),
    ] = None,
    json_path: JsonOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Clean accuracy (ACC), attack success rate (ASR) and robust accuracy (RA) of an ONNX classifier."""
    trigger_options = {
        "patch_size": patch_size, "position": position, "value": value, "trigger_image": trigger_image,
        "mask": mask, "opacity": opacity, "alpha": alpha, "delta": delta, "frequency": frequency, "k": k, "s": s,
        "grid_rescale": grid_rescale, "grid": grid, "levels": levels,
    }  # fmt: skip

    def body() -> None:
        require_extra("eval", "onnxruntime", "torch")
        from onnxclp.eval.api import evaluate
        from onnxclp.eval.runner import describe_input

        kwargs = _common(attack, attack_config, mean, std, input_size, trigger_options, param)
        result = evaluate(
            model, data, target=target, mode=None if mode is None else mode.value, seed=seed,
            layout=None if layout is None else layout.value, batch_size=batch_size, limit=limit,
            device=device.value, x_key=x_key, y_key=y_key, save_examples=save_examples, progress=progress,
            threads=threads, **kwargs,
        )  # fmt: skip
        payload = result.to_dict()
        if json_path is not None:
            _write_json(json_path, payload)
            if json_path == "-":
                return
        m = result.metrics
        lines = [
            ("model", result.model),
            ("provider", f"{result.provider}  ({describe_input(result.input)}; {result.num_classes} classes)"),
            ("data", f"{result.data}: {result.n_samples} samples"),
            ("attack", _attack_line(result.attack)),
            ("normalize", _norm_line(result.attack)),
            ("ACC", f"{_pct(m.acc)}  {m.clean_correct} / {result.n_samples}"),
            ("ASR", f"{_pct(m.asr)}  {m.attack_hits} / {result.n_attacked}"),
            ("RA", f"{_pct(m.ra)}  {m.attack_robust} / {result.n_attacked}"),
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

    run_guarded(body, debug)


def compare_command(
    original: Annotated[Path, typer.Argument(help="The original ONNX model.", show_default=False)],
    sanitized: Annotated[Path, typer.Argument(help="The sanitized ONNX model.", show_default=False)],
    data: DataOpt,
    attack: AttackOpt = None,
    attack_config: AttackConfigOpt = None,
    target: TargetOpt = None,
    mode: ModeOpt = None,
    seed: SeedOpt = None,
    patch_size: PatchSizeOpt = None,
    position: PositionOpt = None,
    value: ValueOpt = None,
    trigger_image: TriggerImageOpt = None,
    mask: MaskOpt = None,
    opacity: OpacityOpt = None,
    alpha: AlphaOpt = None,
    delta: DeltaOpt = None,
    frequency: FrequencyOpt = None,
    k: KOpt = None,
    s: SOpt = None,
    grid_rescale: GridRescaleOpt = None,
    grid: GridOpt = None,
    levels: LevelsOpt = None,
    param: ParamOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    layout: LayoutOpt = None,
    input_size: InputSizeOpt = None,
    x_key: XKeyOpt = None,
    y_key: YKeyOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchOpt = 256,
    device: DeviceOpt = Device.auto,
    threads: ThreadsOpt = None,
    json_path: JsonOpt = None,
    progress: ProgressOpt = True,
    debug: DebugOpt = False,
) -> None:
    """Both models on the same attack set: ACC, ASR, RA, their differences and prediction agreement."""
    trigger_options = {
        "patch_size": patch_size, "position": position, "value": value, "trigger_image": trigger_image,
        "mask": mask, "opacity": opacity, "alpha": alpha, "delta": delta, "frequency": frequency, "k": k, "s": s,
        "grid_rescale": grid_rescale, "grid": grid, "levels": levels,
    }  # fmt: skip

    def body() -> None:
        require_extra("eval", "onnxruntime", "torch")
        from onnxclp.eval.api import compare
        from onnxclp.eval.runner import describe_input

        kwargs = _common(attack, attack_config, mean, std, input_size, trigger_options, param)
        result = compare(
            original, sanitized, data, target=target, mode=None if mode is None else mode.value, seed=seed,
            layout=None if layout is None else layout.value, batch_size=batch_size, limit=limit,
            device=device.value, x_key=x_key, y_key=y_key, progress=progress, threads=threads, **kwargs,
        )  # fmt: skip
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
        typer.echo(f"{'normalize':<11} {_norm_line(result.attack)}")
        typer.echo(f"{'':<11} {'original':>10} {'sanitized':>10} {'change':>11}")
        for name in ("acc", "asr", "ra"):
            a, b = getattr(o, name), getattr(s_, name)
            typer.echo(f"{name.upper():<11} {_pct(a):>10} {_pct(b):>10} {_pts(result.deltas[name]):>11}")
        typer.echo(
            f"{'agreement':<11} {_pct(result.agreement).strip()} of clean predictions, "
            f"{_pct(result.triggered_agreement).strip()} of triggered ones"
        )
        typer.echo(
            f"{'throughput':<11} {result.images_per_second:.0f} images/s  ({result.images} images in "
            f"{result.seconds:.2f} s; {result.total_seconds:.2f} s in all)"
        )

    run_guarded(body, debug)


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` and ``compare`` commands to ``app``."""
    app.command("evaluate")(evaluate_command)
    app.command("compare")(compare_command)
