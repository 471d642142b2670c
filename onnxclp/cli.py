"""Command-line interface: a thin Typer shell over the Python API.

Parses options, calls :mod:`onnxclp.api`, prints, and maps :class:`~onnxclp.errors.OnnxclpError` to exit
codes (README, "Exit codes"). Heavy modules (torch, onnxruntime) are only imported inside the commands that
need them, so ``onnxclp sanitize`` starts fast.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from onnxclp.errors import EXIT_INTERNAL, EXIT_OUTLIERS, OnnxclpError

app = typer.Typer(
    name="onnxclp",
    help="Data-free backdoor removal (CLP, LPP) for ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

T = TypeVar("T")


def main() -> None:
    """Console-script entry point."""
    app()


def _one_line(text: str) -> str:
    """A message as one printable line: newlines, escape sequences and other control characters from a
    hostile file (names, paths) are shown escaped, never sent to the terminal or split into lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_guarded(fn: Callable[[], T], debug: bool) -> T:
    """Run ``fn``; turn errors into one line on stderr and an exit code (traceback only with --debug).

    :class:`OnnxclpError` (bad or hostile input) exits with its code, 2 unless said otherwise; anything else
    is a bug in onnxclp and exits 4.
    """
    try:
        return fn()
    except OnnxclpError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {_one_line(exc.message)}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except MemoryError:
        typer.echo("error: out of memory", err=True)
        raise typer.Exit(EXIT_INTERNAL) from None
    except Exception as exc:
        if debug:
            traceback.print_exc()
        message = _one_line(f"{type(exc).__name__}: {exc}")
        typer.echo(f"internal error: {message} (a bug in onnxclp; rerun with --debug)", err=True)
        raise typer.Exit(EXIT_INTERNAL) from None


Method = Annotated[
    str, typer.Option("--method", "-m", help="clp (CLP, ECCV 2022) or lpp (Lipschitzness precise pruning).")
]
U = Annotated[
    float | None, typer.Option("--u", "-u", help="Upper threshold: mean + u*std per layer [3; both methods].")
]
InlineFunctions = Annotated[
    bool,
    typer.Option(
        "--inline-functions",
        help="Inline model-local functions first so the layers inside them are scored (the output has none).",
    ),
]
ULow = Annotated[float | None, typer.Option("--u-low", help="LPP lower threshold: prune below mean + u_low*std [-3].")]
Bias = Annotated[
    float | None,
    typer.Option("--bias-rate", help="LPP: rescale channels in (mean+(u-b)*std, mean+u*std] [1]."),
]
TopK = Annotated[
    int | None, typer.Option("--topk", help="LPP: classifier weights zeroed in the suspected target row [0].")
]
Score = Annotated[str | None, typer.Option("--score", help="spectral (CLP default), l2 (LPP default) or exact.")]
IncludeFC = Annotated[
    bool | None,
    typer.Option("--include-fc/--no-include-fc", help="Score fully connected layers (CLP: off by default)."),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option("--exclude", help="Regex on layer or weight names to leave alone (repeatable)."),
]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="List every layer, even on large models.")]


def _print(report, quiet: bool, verbose: bool) -> None:
    if quiet:  # plain text: no rich import on the quiet CI path
        t = report.totals()
        typer.echo(
            f"{t['pruned_channels']} of {t['channels']} channels pruned in {t['scored_layers']} layers "
            f"({t['skipped_layers']} skipped)"
        )
        return
    from rich.console import Console

    from onnxclp.report import print_report

    print_report(report, Console(highlight=False), verbose)


def _write_json(report, path: Path | None) -> None:
    if path is None:
        return
    try:
        path.write_text(report.to_json())
    except OSError as exc:
        raise OnnxclpError(f"{path}: cannot write the report ({exc.strerror or exc})") from exc


@app.command()
def sanitize(
    input: Annotated[Path, typer.Argument(help="The ONNX model to sanitize (never modified).")],
    output: Annotated[Path, typer.Argument(help="Where to write the sanitized model.")],
    method: Method = "clp",
    u: U = None,
    u_low: ULow = None,
    bias_rate: Bias = None,
    topk: TopK = None,
    score: Score = None,
    include_fc: IncludeFC = None,
    exclude: Exclude = None,
    fuse_bn: Annotated[
        bool, typer.Option("--fuse-bn", help="Fold paired BatchNormalizations into their layers.")
    ] = False,
    inline_functions: InlineFunctions = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the report as JSON.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Allow OUTPUT to be INPUT.")] = False,
    calibrate: Annotated[
        Path | None,
        typer.Option("--calibrate", help="Clean labelled images: choose the smallest u within --max-acc-drop."),
    ] = None,
    max_acc_drop: Annotated[
        float, typer.Option("--max-acc-drop", help="Calibration budget: clean accuracy drop in points.")
    ] = 1.0,
    calibrate_grid: Annotated[
        str | None, typer.Option("--calibrate-grid", help="Candidate u for --calibrate [0.5:8:0.25].")
    ] = None,
    mean: Annotated[str | None, typer.Option("--mean", help="Calibration images: normalisation mean R,G,B.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Calibration images: normalisation std R,G,B.")] = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Prune (and, with lpp, rescale) backdoor channels; write OUTPUT and a report."""

    def go():
        from onnxclp.api import sanitize_file

        chosen = u
        if calibrate is not None:  # needs torch and onnxruntime: imported only here
            from onnxclp.study.cli import calibrate_for_sanitize

            if u is not None:
                raise OnnxclpError("--u and --calibrate exclude each other")
            lpp = {"u_low": u_low, "bias_rate": bias_rate, "topk": topk}
            chosen = calibrate_for_sanitize(
                input, calibrate, method, max_acc_drop, calibrate_grid, mean, std,
                {**lpp, "score": score, "include_fc": include_fc, "exclude": exclude or (),
                 "inline_functions": inline_functions},
            )  # fmt: skip
        rep = sanitize_file(
            input,
            output,
            method,
            chosen,
            u_low=u_low,
            bias_rate=bias_rate,
            topk=topk,
            score=score,
            include_fc=include_fc,
            exclude=exclude or (),
            fuse_bn=fuse_bn,
            force=force,
            inline_functions=inline_functions,
        )
        _write_json(rep, report)
        _print(rep, quiet, verbose)
        typer.echo(f"wrote {', '.join(rep.written)}", err=True)

    run_guarded(go, debug)


@app.command()
def scan(
    input: Annotated[Path, typer.Argument(help="The ONNX model to analyse.")],
    method: Method = "clp",
    u: U = None,
    u_low: ULow = None,
    bias_rate: Bias = None,
    topk: TopK = None,
    score: Score = None,
    include_fc: IncludeFC = None,
    exclude: Exclude = None,
    inline_functions: InlineFunctions = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write score histograms per layer (PNG) into this folder.")
    ] = None,
    fail_on_outliers: Annotated[
        bool, typer.Option("--fail-on-outliers", help="Exit 1 when any channel is flagged (a CI gate).")
    ] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Report per-layer channel scores and outliers, without writing a model."""

    def go():
        from onnxclp.api import scan as scan_api

        rep = scan_api(
            input,
            method,
            u,
            u_low=u_low,
            bias_rate=bias_rate,
            topk=topk,
            score=score,
            include_fc=include_fc,
            exclude=exclude or (),
            inline_functions=inline_functions,
        )
        _write_json(rep, json_path)
        _print(rep, quiet, verbose)
        if plot is not None:  # matplotlib only here
            from onnxclp.study.cli import write_score_plots

            write_score_plots(rep, plot)
        return rep

    rep = run_guarded(go, debug)
    if fail_on_outliers and rep.pruned_channels:
        typer.echo(f"{rep.pruned_channels} channels flagged in {rep.flagged_layers} layers", err=True)
        raise typer.Exit(EXIT_OUTLIERS)


@app.command()
def version() -> None:
    """Print the onnxclp version."""
    from onnxclp import __version__

    typer.echo(__version__)


def _register_eval_commands() -> None:
    # evaluate / compare live in onnxclp.eval; that module imports nothing heavy at top level.
    try:
        from onnxclp.eval.cli import register
    except ImportError:  # the eval package is not present
        return
    register(app)


_register_eval_commands()


def _register_study_commands() -> None:
    # sweep / tac live in onnxclp.study; that module imports nothing heavy at top level.
    try:
        from onnxclp.study.cli import register
    except ImportError:  # the study package (or its eval dependency) is not present
        return
    register(app)


_register_study_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
