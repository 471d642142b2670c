"""The ``evaluate`` and ``compare`` commands, added to the main Typer app by :func:`register`; their options (shared
with ``sweep`` and ``tac``: :func:`~onnxclp.cli.options.with_run_options`) are :mod:`onnxclp.cli.options`.

This module imports nothing heavy at load time (no torch, onnxruntime, PIL or matplotlib): the commands check
the ``eval`` extra (one line naming it, exit 2, when it is missing) and import :mod:`onnxclp.eval` when they
run, so ``onnxclp sanitize`` starts as fast as before.

Exit codes: 0 success; 2 bad input or usage (one line ``error: ...`` on stderr, a traceback only with
``--debug``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxclp.cli.common import check_writable, run_guarded, write_text
from onnxclp.cli.options import (  # RunArgs, with_run_options and attack_names: re-exported, their former home
    DebugOpt,
    JsonOpt,
    RunArgs,
    SaveExamplesOpt,
    attack_names,
    with_run_options,
)
from onnxclp.parsing import parse_numbers  # re-exported: its former home

__all__ = [
    "RunArgs",
    "attack_names",
    "compare_command",
    "evaluate_command",
    "parse_numbers",
    "register",
    "with_run_options",
]


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
