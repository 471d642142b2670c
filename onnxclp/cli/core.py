"""The core commands: ``sanitize``, ``scan``, ``methods`` and ``version`` (no torch or onnxruntime at start-up)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxclp.cli.common import (
    Debug,
    Device,
    DeviceOpt,
    Exclude,
    InlineFunctions,
    Quiet,
    Streams,
    Verbose,
    check_writable,
    one_line,
    require_extra,
    run_guarded,
    with_method_options,
    write_text,
)
from onnxclp.errors import EXIT_OK, EXIT_OUTLIERS, OnnxclpError


class Format(str, Enum):
    text = "text"
    json = "json"
    sarif = "sarif"


class FailOn(str, Enum):
    suspicious = "suspicious"
    outliers = "outliers"
    never = "never"


MeanOpt = Annotated[
    str | None,
    typer.Option("--mean", metavar="R,G,B", help="Input normalisation mean (images in [0,1] -> model input)."),
]
StdOpt = Annotated[str | None, typer.Option("--std", metavar="R,G,B", help="Input normalisation std (with --mean).")]
InputShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", metavar="C,H,W", help="One input image's shape when the graph has none.")
]


def model_context(mean: str | None, std: str | None, input_shape: str | None, device: Device) -> dict[str, Any]:
    """What methods and detectors that run the model read (``Options.context``)."""
    from onnxclp.cli.eval import parse_numbers

    shape = parse_numbers(input_shape, "--input-shape")
    return {
        "mean": parse_numbers(mean, "--mean"),
        "std": parse_numbers(std, "--std"),
        "input_shape": None if shape is None else [int(x) for x in shape],
        "device": device.value,
    }


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Report format: text, json or sarif.")]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Write the report here ('-' = stdout; default: text on stdout).")
]


def _print(report: Any, quiet: bool, verbose: bool) -> None:
    if quiet:  # plain text: no rich import on the quiet CI path
        t = report.totals()
        typer.echo(
            f"{t['pruned_channels']} of {t['channels']} channels pruned in {t['scored_layers']} layers "
            f"({t['skipped_layers']} skipped)"
        )
        return
    from onnxclp.report import print_report

    print_report(report, None, verbose)


def _write_report(report: Any, fmt: Format, target: str | None) -> None:
    if target is None:
        return
    if fmt is Format.sarif:
        from onnxclp import __version__
        from onnxclp.sarif import to_sarif

        entry = {"path": report.input, "verdict": report.verdict.get("verdict") if report.verdict else None,
                 "target": None, "error": None, "detectors": {}, "report": report.to_dict()}  # fmt: skip
        text = json.dumps(to_sarif([entry], tool_version=__version__, base_dir="."), indent=2) + "\n"
    else:
        text = report.to_json()
    write_text(target, text, "report")


@with_method_options()
def sanitize(
    input: Annotated[Path, typer.Argument(help="The ONNX model to sanitize (never modified).")],
    output: Annotated[Path, typer.Argument(help="Where to write the sanitized model.")],
    method_values: dict[str, Any],
    method: str = "clp",
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Exclude = None,
    streams: Streams = "strongest",
    fuse_bn: Annotated[
        bool, typer.Option("--fuse-bn", help="Fold paired BatchNormalizations into their layers.")
    ] = False,
    inline_functions: InlineFunctions = False,
    report: Annotated[str | None, typer.Option("--report", help="Write the report here ('-' = stdout).")] = None,
    report_format: Annotated[
        Format, typer.Option("--report-format", help="Format of --report: json (default), sarif.")
    ] = Format.json,
    force: Annotated[
        bool, typer.Option("--force", help="Allow OUTPUT to be INPUT, and parameter values far outside the paper's.")
    ] = False,
    clean_data: Annotated[
        Path | None, typer.Option("--clean-data", help="Clean labelled images for methods that need them.")
    ] = None,
    clean_n: Annotated[int, typer.Option("--clean-n", help="How many clean images such a method reads.")] = 500,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            "--calibrate", help="Clean labelled images: choose the least invasive setting within --max-acc-drop."
        ),
    ] = None,
    max_acc_drop: Annotated[
        float, typer.Option("--max-acc-drop", help="Calibration budget: clean accuracy drop in points.")
    ] = 1.0,
    calibrate_grid: Annotated[
        str | None, typer.Option("--calibrate-grid", help="Candidate u for --calibrate [0.5:8:0.25].")
    ] = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    input_shape: InputShapeOpt = None,
    device: DeviceOpt = Device.auto,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Prune (and, with some methods, rescale) backdoor channels; write OUTPUT and a report."""

    def go() -> None:
        from onnxclp import methods
        from onnxclp.api import check_output, sanitize_file

        values = dict(method_values)
        check_output(input, output, force)  # every output path is checked before any work
        if report is not None and report_format is Format.text:
            raise OnnxclpError("--report-format: json or sarif")
        check_writable(report, "report")
        m = methods.get(method)
        context = model_context(mean, std, input_shape, device)
        if m.needs == "clean-data":
            if clean_data is None:
                raise OnnxclpError(f"--method {method} needs clean labelled images: give --clean-data")
            context.update(clean_data=clean_data, clean_n=clean_n)
        if values.get("target_from") == "mmbd":
            require_extra("eval", "torch")
        if m.extra is not None:
            require_extra(m.extra, "torch")
        allow_risk = force
        if calibrate is not None:
            require_extra("eval", "onnxruntime", "torch")
            from onnxclp.study.calibrate import calibrate_for_sanitize

            if "u" in values:
                raise OnnxclpError("--u and --calibrate exclude each other")
            values = calibrate_for_sanitize(
                input, calibrate, method, max_acc_drop, calibrate_grid, mean, std, values,
                {"score": score, "include_fc": include_fc, "exclude": exclude or (), "inline_functions": inline_functions},
            )  # fmt: skip
            allow_risk = True  # a measured choice within the accuracy budget, reported as such
        rep = sanitize_file(
            input, output, method, score=score, include_fc=include_fc, exclude=exclude or (), fuse_bn=fuse_bn,
            force=force, allow_risky=allow_risk, inline_functions=inline_functions, context=context, streams=streams,
            **values,
        )  # fmt: skip
        if calibrate is not None:
            rep.notes.append(f"calibrated on {calibrate}: {', '.join(f'{k}={v:g}' for k, v in values.items())}")
        _write_report(rep, report_format, report)
        if report != "-":
            _print(rep, quiet, verbose)
        for note in rep.notes:
            typer.echo(one_line(note), err=True)
        typer.echo(f"wrote {one_line(', '.join(rep.written))}", err=True)

    run_guarded(go, debug)


@with_method_options()
def scan(
    paths: Annotated[list[str], typer.Argument(help="ONNX files, folders (every *.onnx below) or globs.")],
    method_values: dict[str, Any],
    method: str = "clp",
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Exclude = None,
    streams: Streams = "strongest",
    inline_functions: InlineFunctions = False,
    fmt: FormatOpt = Format.text,
    output: OutputOpt = None,
    json_path: Annotated[
        str | None, typer.Option("--json", help="Also write the JSON list here ('-' = stdout).")
    ] = None,
    detector: Annotated[
        list[str] | None,
        typer.Option("--detector", help="Model-level detectors to run (default: the weight-only ones)."),
    ] = None,
    fpr: Annotated[
        float, typer.Option("--fpr", help="False-positive rate of the verdict: suspicious when p < fpr.")
    ] = 0.05,
    fail_on: Annotated[
        FailOn | None,
        typer.Option("--fail-on", help="Exit 1 on: suspicious (model verdict), outliers (any flagged channel), never."),
    ] = None,
    fail_on_outliers: Annotated[
        bool, typer.Option("--fail-on-outliers", help="Exit 1 when any channel is flagged (= --fail-on outliers).")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write score histograms per layer (PNG) into this folder.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Models scanned in parallel (default: cores, capped by memory).")
    ] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run on Ray: 'local', 'auto' (RAY_ADDRESS) or an address.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Accept parameter values far outside the paper's.")] = False,
    mean: MeanOpt = None,
    std: StdOpt = None,
    input_shape: InputShapeOpt = None,
    device: DeviceOpt = Device.auto,
    quiet: Quiet = False,
    verbose: Verbose = False,
    debug: Debug = False,
) -> None:
    """Report channel scores, outliers and a model-level verdict (clean / suspicious) for one or many models."""

    def go() -> int:
        from onnxclp import scanning

        if fail_on is not None and fail_on_outliers:
            raise OnnxclpError("--fail-on and --fail-on-outliers exclude each other")
        if not 0 < fpr < 1:
            raise OnnxclpError(f"--fpr must be between 0 and 1, got {fpr:g}")
        for target in (output, json_path):
            check_writable(target)
        if plot is not None:
            require_extra("eval", "matplotlib")
        from onnxclp import detect

        for n in detector or ():
            if detect.get(n).extra is not None:
                require_extra(detect.get(n).extra or "", "torch")
        files, missing = scanning.expand_paths(paths)
        config = scanning.ScanConfig(
            method=method, values=dict(method_values), score=score, include_fc=include_fc,
            exclude=tuple(exclude or ()), inline_functions=inline_functions, detectors=tuple(detector or ()),
            fpr=fpr, force=force, streams=streams, context=model_context(mean, std, input_shape, device),
        )  # fmt: skip
        config.check()
        results = scanning.scan_many(files, config, workers=workers, ray=ray) + missing
        if not results:
            raise OnnxclpError("no ONNX model found in " + ", ".join(paths))
        scanning.print_errors(results)
        if json_path is not None:
            write_text(json_path, json.dumps(results, indent=2) + "\n", "JSON report")
        target = output if output is not None else ("-" if fmt is not Format.text else None)
        if fmt is Format.json:
            write_text(target or "-", json.dumps(results, indent=2) + "\n", "JSON report")
        elif fmt is Format.sarif:
            from onnxclp import __version__
            from onnxclp.sarif import to_sarif

            sarif = to_sarif(results, tool_version=__version__, base_dir=".")
            write_text(target or "-", json.dumps(sarif, indent=2) + "\n", "SARIF report")
        else:
            write_text(target or "-", scanning.render_text(results, quiet=quiet, verbose=verbose))
        if plot is not None:
            from onnxclp.study.plots import write_score_plots

            for r in results:
                if r.get("report") is not None:
                    write_score_plots(r["report"], plot / Path(r["path"]).stem if len(results) > 1 else plot)
        mode = FailOn.outliers if fail_on_outliers else fail_on
        return scanning.exit_code(results, None if mode is None else mode.value)

    code = run_guarded(go, debug)
    if code != EXIT_OK:
        if code == EXIT_OUTLIERS and not quiet:
            typer.echo("scan: finding(s) per --fail-on (exit 1)", err=True)
        raise typer.Exit(code)


def methods(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list (name, needs, description, defaults...).")
    ] = False,
) -> None:
    """List the registered defence methods."""
    from onnxclp.methods import describe

    rows = describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        params = " ".join(f"{p['flag']}={p['default']}" for p in r["parameters"])
        typer.echo(f"{r['name']:<8} needs {r['needs']:<10} {r['description']}")
        typer.echo(
            f"{'':<8} {params}  score={r['defaults']['score']}" + (f"  extra={r['extra']}" if r["extra"] else "")
        )


def version() -> None:
    """Print the onnxclp version."""
    from onnxclp import __version__

    typer.echo(__version__)


def register(app: typer.Typer) -> None:
    app.command("sanitize")(sanitize)
    app.command("scan")(scan)
    app.command("methods")(methods)
    app.command("version")(version)
