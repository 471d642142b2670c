"""The core commands: ``sanitize``, ``scan``, ``methods`` and ``version`` (no torch or onnxruntime at start-up)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from onnxclp.cli.common import check_writable, one_line, require_extra, run_guarded, write_text
from onnxclp.cli.options import (
    MODEL_INPUT,
    Debug,
    Exclude,
    InlineFunctions,
    ModelInput,
    Quiet,
    ReportFormat,
    Streams,
    Verbose,
    with_method_options,
    with_model_input,
)
from onnxclp.errors import EXIT_OK, OnnxclpError


class Format(str, Enum):
    text = "text"
    json = "json"
    sarif = "sarif"


class FailOn(str, Enum):
    suspicious = "suspicious"
    outliers = "outliers"
    never = "never"


FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Report format: text, json or sarif.")]
OutputOpt = Annotated[
    str | None, typer.Option("--output", "-o", help="Write the report here ('-' = stdout; default: text on stdout).")
]


def _records_norm(path: Path) -> bool:
    """Whether the model records its input normalisation in its metadata or takes 8-bit pixels (read as ``evaluate``
    reads it; the sanitize pipeline then applies it to the clean images). A file that cannot be read answers False:
    the pipeline's own loader reports it."""
    import onnx

    from onnxclp.eval.normalize import input_normalization

    try:  # the graph and metadata only: no external data is followed
        return input_normalization(onnx.load(str(path), load_external_data=False)) is not None
    except Exception:  # unreadable here: the pipeline's own loader reports it
        return False


def _print(report: Any, quiet: bool, verbose: bool) -> None:
    if quiet:  # plain text: no rich import on the quiet CI path
        t = report.totals()
        typer.echo(
            f"{t['pruned_channels']} of {t['channels']} channels pruned in {t['scored_layers']} layers "
            f"({t['skipped_layers']} skipped)"
        )
        return
    from onnxclp.render import print_report

    print_report(report, None, verbose)


def _write_report(report: Any, fmt: Format, target: str | None) -> None:
    if target is None:
        return
    if fmt is Format.sarif:
        from onnxclp import __version__
        from onnxclp.sarif import SANITIZED, to_sarif

        verdict = report.verdict.get("verdict") if report.verdict else SANITIZED  # sanitize runs no detector
        entry = {"path": report.input, "verdict": verdict, "target": None, "error": None, "detectors": {},
                 "report": report.to_dict()}  # fmt: skip
        text = json.dumps(to_sarif([entry], tool_version=__version__, base_dir="."), indent=2) + "\n"
    else:
        text = report.to_json()
    write_text(target, text, "report")


@with_method_options()
@with_model_input
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
    drop_initializer_inputs: Annotated[
        bool,
        typer.Option(
            "--drop-initializer-inputs",
            help="Also remove the initializers from the graph inputs, so that no caller can feed the weights "
            "(IR version 4 or later; IR version 3 requires them as inputs).",
        ),
    ] = False,
    report: Annotated[str | None, typer.Option("--report", help="Write the report here ('-' = stdout).")] = None,
    report_format: Annotated[
        ReportFormat, typer.Option("--report-format", help="Format of --report: json (default) or sarif.")
    ] = ReportFormat.json,
    force: Annotated[
        bool, typer.Option("--force", help="Allow OUTPUT to be INPUT, and parameter values far outside the paper's.")
    ] = False,
    clean_data: Annotated[
        str | None,
        typer.Option(
            "--clean-data",
            help="Clean labelled images of the model's task: an .npz with x_test (N,H,W,C or N,C,H,W; uint8 0-255 "
            "or float 0-1) and y_test (N, int), a CIFAR batch or a folder of class folders. Needed by repairs; "
            "with any method the accuracy guard measures the result on a held-out part. 'synthetic[:N]' (default "
            "N 1000; ',steps=10' and other settings: docs/algorithms.md): images synthesized from the model "
            "alone and labelled by it; the guard then measures agreement with the input model, not accuracy "
            "(a synthetic.npz --save-synthetic wrote reads back the same way, with its own split).",
        ),
    ] = None,
    save_synthetic: Annotated[
        Path | None,
        typer.Option(
            "--save-synthetic", help="With --clean-data synthetic: write the set (synthetic.npz) and a grid PNG here."
        ),
    ] = None,
    clean_n: Annotated[int, typer.Option("--clean-n", help="How many clean images are read (seeded subset).")] = 500,
    x_key: Annotated[str | None, typer.Option("--x-key", help="Images array of the --clean-data .npz.")] = None,
    y_key: Annotated[str | None, typer.Option("--y-key", help="Labels array of the --clean-data .npz.")] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(
            "--val-fraction",
            help="Share of the clean images kept for validation (>= 100): it tests the method's candidates in "
            "sequence and checks the result (default 0.4; with --clean-data synthetic 0.2).",
        ),
    ] = None,
    select_fraction: Annotated[
        float | None,
        typer.Option(
            "--select-fraction",
            help="Share of the clean images kept apart to choose a method's strength (epochs, counts, thresholds; "
            ">= 100); the validation part then checks the choice alone (default 0: no such part).",
        ),
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(
            "--calibrate", help="Same as --clean-data (kept for old scripts): the guard tunes u and checks the result."
        ),
    ] = None,
    max_acc_drop: Annotated[
        float,
        typer.Option(
            "--max-acc-drop",
            help="Budget in points of clean accuracy: a result the guard cannot show within it (at "
            "--confidence) is not written.",
        ),
    ] = 3.0,
    confidence: Annotated[
        float,
        typer.Option(
            "--confidence",
            help="How sure the final check must be that the result is within --max-acc-drop: it accepts when the "
            "drop's one-sided upper bound at this confidence is in budget (0.5: the measured drop alone).",
        ),
    ] = 0.9,
    calibrate_grid: Annotated[
        str | None, typer.Option("--calibrate-grid", help="Candidate u the guard tries with clean data [0.5:8:0.25].")
    ] = None,
    model_input: ModelInput = MODEL_INPUT,  # --mean, --std, --input-shape, --device (with_model_input)
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
        check_writable(report, "report")
        m = methods.get(method)
        context = model_input.context()
        data = clean_data
        if calibrate is not None:  # issue 18: --calibrate is the guard's mechanism (one data option, one split)
            if clean_data is not None:
                raise OnnxclpError("--calibrate is --clean-data now: give one of them")
            data = str(calibrate)
        if calibrate_grid is not None:
            if data is None:
                raise OnnxclpError("--calibrate-grid needs --clean-data")
            from onnxclp.study.sweep import parse_grid

            context["u_grid"] = parse_grid(calibrate_grid)
        if m.needs == "clean-data" and data is None:
            raise OnnxclpError(f"--method {method} needs clean labelled images: give --clean-data")
        context.update(quiet=quiet)
        if data is not None:  # any method: the accuracy guard measures the result (onnxclp.guard)
            require_extra("eval", "onnxruntime", "torch")
            context.update(clean_data=data, clean_n=clean_n, x_key=x_key, y_key=y_key,
                           val_fraction=val_fraction, select_fraction=select_fraction,
                           max_acc_drop=max_acc_drop, guard_confidence=confidence)  # fmt: skip
            if data.strip().lower().startswith("synthetic"):  # issue 21: made from the model, not read
                from onnxclp.defences.synth import parse_spec

                parse_spec(data)
                context.update(save_synthetic=save_synthetic)
            else:
                context["clean_data"] = Path(data)
                if model_input.mean is None and model_input.std is None and not quiet and not _records_norm(input):
                    typer.echo(
                        "warning: no --mean/--std and none recorded in the model's metadata: the clean images go "
                        "to the model as [0, 1] pixels; give the normalisation the model was trained with",
                        err=True,
                    )
        synthetic = str(context.get("clean_data") or "").strip().lower().startswith("synthetic")
        if save_synthetic is not None and not synthetic:
            raise OnnxclpError("--save-synthetic needs --clean-data synthetic[:N]")
        if values.get("target_from") == "mmbd":
            require_extra("eval", "torch")
        if m.extra is not None:
            require_extra(m.extra, "torch")
        rep = sanitize_file(
            input, output, method, score=score, include_fc=include_fc, exclude=exclude or (), fuse_bn=fuse_bn,
            force=force, allow_risky=force, inline_functions=inline_functions, context=context, streams=streams,
            drop_initializer_inputs=drop_initializer_inputs, **values,
        )  # fmt: skip
        _write_report(rep, Format(report_format.value), report)
        if report != "-":
            _print(rep, quiet, verbose)
        from onnxclp.report import unique_notes

        for note in unique_notes(rep.notes):
            typer.echo(one_line(note), err=True)
        if rep.guard is not None and not quiet:
            from onnxclp.guard import GuardResult

            typer.echo(GuardResult(**rep.guard).summary(), err=True)
        typer.echo(f"wrote {one_line(', '.join(rep.written))}", err=True)
        if report is not None and report != "-":
            typer.echo(f"report: {report}", err=True)

    run_guarded(go, debug)


@with_method_options()
@with_model_input
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
    sarif_path: Annotated[
        str | None, typer.Option("--sarif", help="Also write the SARIF log here ('-' = stdout).")
    ] = None,
    detector: Annotated[
        list[str] | None,
        typer.Option(
            "--detector",
            help="Model-level detectors (default: classifier; mmbd too when torch is installed; nc too with "
            "--clean-data).",
        ),
    ] = None,
    fpr: Annotated[
        float, typer.Option("--fpr", help="False-positive rate of the verdict on clean models (docs/detect.md).")
    ] = 0.01,
    fail_on: Annotated[
        FailOn | None,
        typer.Option(
            "--fail-on",
            metavar="WHEN",
            help="Fail on: suspicious (exit 1; an unverified model exits 6), outliers (any flagged channel: 1), "
            "never. Default: report only.",
        ),
    ] = None,
    allow_unverified: Annotated[
        bool,
        typer.Option("--allow-unverified", help="Let a model no detector could examine pass --fail-on suspicious."),
    ] = False,
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
    clean_data: Annotated[
        Path | None,
        typer.Option(
            "--clean-data",
            help="Clean labelled images of the models' task (as sanitize's --clean-data): the few-shot detector "
            "'nc' (Neural Cleanse, about 3 minutes per CIFAR-10 ResNet-14 on two CPU cores) runs on them.",
        ),
    ] = None,
    clean_n: Annotated[int, typer.Option("--clean-n", help="How many clean images are read (seeded subset).")] = 500,
    x_key: Annotated[str | None, typer.Option("--x-key", help="Images array of the --clean-data .npz.")] = None,
    y_key: Annotated[str | None, typer.Option("--y-key", help="Labels array of the --clean-data .npz.")] = None,
    model_input: ModelInput = MODEL_INPUT,  # --mean, --std, --input-shape, --device (with_model_input)
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
        for target in (output, json_path, sarif_path):
            check_writable(target)
        if plot is not None:
            require_extra("plot", "matplotlib")
        from onnxclp import detect

        for n in detector or ():
            if detect.get(n).extra is not None:
                require_extra(detect.get(n).extra or "", "torch")
        files, missing = scanning.expand_paths(paths)
        context = model_input.context()
        if clean_data is not None:
            require_extra("eval", "torch")
            if not clean_data.exists():
                raise OnnxclpError(f"--clean-data {clean_data}: no such file or folder")
            context.update(scan_clean_data=clean_data, clean_n=clean_n, x_key=x_key, y_key=y_key)
        chosen = tuple(detector or ())
        if clean_data is not None and not chosen:  # the few-shot detector joins the default ones
            chosen = (*detect.default_names(), "nc")
        config = scanning.ScanConfig(
            method=method, values=dict(method_values), score=score, include_fc=include_fc,
            exclude=tuple(exclude or ()), inline_functions=inline_functions, detectors=chosen,
            fpr=fpr, force=force, streams=streams, context=context,
        )  # fmt: skip
        config.check()
        results = scanning.scan_many(files, config, workers=workers, ray=ray) + missing
        if not results:
            raise OnnxclpError("no ONNX model found in " + ", ".join(paths))
        scanning.print_errors(results)
        if json_path is not None:
            write_text(json_path, json.dumps(results, indent=2) + "\n", "JSON report")
        mode = FailOn.outliers if fail_on_outliers else fail_on
        gate = None if mode is None else mode.value
        if sarif_path is not None or fmt is Format.sarif:
            from onnxclp import __version__
            from onnxclp.sarif import to_sarif

            log = to_sarif(
                results, tool_version=__version__, base_dir=".", fail_on=gate, allow_unverified=allow_unverified
            )
            sarif = json.dumps(log, indent=2)
            if sarif_path is not None:
                write_text(sarif_path, sarif + "\n", "SARIF report")
        target = output if output is not None else ("-" if fmt is not Format.text else None)
        if fmt is Format.json:
            write_text(target or "-", json.dumps(results, indent=2) + "\n", "JSON report")
        elif fmt is Format.sarif:
            write_text(target or "-", sarif + "\n", "SARIF report")
        else:
            write_text(target or "-", scanning.render_text(results, quiet=quiet, verbose=verbose))
        if plot is not None:
            from onnxclp.study.plots import write_score_plots

            for r in results:
                if r.get("report") is not None:
                    write_score_plots(r["report"], plot / Path(r["path"]).stem if len(results) > 1 else plot)
        code = scanning.exit_code(results, gate, allow_unverified)
        # the terminal (stderr) names what failed even when the report went to a file, in JSON/SARIF or with -q
        # one model that could not be read: its one ``error:`` line above says everything (exit 2/3/4)
        alone = len(results) == 1 and results[0]["verdict"] == "error"
        if (fmt is not Format.text or target not in (None, "-")) and not alone:
            typer.echo(scanning.tally(results), err=True)
        for line in scanning.gate_lines(results, gate, allow_unverified):
            typer.echo(line, err=True)
        failed = sum(r["verdict"] == "error" or scanning.fails_gate(r, gate, allow_unverified) for r in results)
        if code != EXIT_OK and not alone:
            typer.echo(f"scan: {failed} of {len(results)} models failed the gate (--fail-on {gate}): exit {code}"
                       if gate else f"scan: {failed} of {len(results)} models could not be scanned: exit {code}",
                       err=True)  # fmt: skip
        hint = None if quiet else scanning.next_step(results, method, tuple(detector or ()), allow_unverified)
        if hint:
            typer.echo(hint, err=True)
        return code

    code = run_guarded(go, debug)
    if code != EXIT_OK:
        raise typer.Exit(code)


def methods(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON list (name, needs, description, defaults...).")
    ] = False,
) -> None:
    """List the registered defence methods: the data and the extra each needs, what it does, its defaults."""
    import shutil
    import textwrap

    from onnxclp.cli.common import extra_hint
    from onnxclp.methods import describe

    rows = describe()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(60, shutil.get_terminal_size((80, 24)).columns)  # COLUMNS, else the terminal's, else 80
    data = {"nothing": "none", "clean-data": "--clean-data"}
    cells = [["method", "data", "extra", "what it does (defaults)"]]
    for r in rows:
        defaults = [f"{p['flag']}={p['default']}" for p in r["parameters"]]
        defaults += [f"--score={r['defaults']['score']}"] if r["defaults"]["score"] else []
        text = f"{r['description']} ({', '.join(defaults)})" if defaults else r["description"]
        cells.append([r["name"], data.get(r["needs"], r["needs"]), r["extra"] or "-", text])
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    indent = sum(widths) + 2 * 3
    for c in cells:
        head = "  ".join(x.ljust(w) for x, w in zip(c, widths, strict=False)) + "  "
        lines = textwrap.wrap(c[3], max(20, width - indent), break_on_hyphens=False) or [""]
        typer.echo(head + lines[0])
        for line in lines[1:]:
            typer.echo(" " * indent + line)
    extras = sorted({r["extra"] for r in rows if r["extra"]})
    for extra in extras:
        typer.echo(textwrap.fill(f"extra {extra}: {extra_hint(extra)}", width, subsequent_indent="  "))


def version() -> None:
    """Print the onnxclp version."""
    from onnxclp import __version__

    typer.echo(__version__)


def register(app: typer.Typer) -> None:
    app.command("sanitize")(sanitize)
    app.command("scan")(scan)
    app.command("methods")(methods)
    app.command("version")(version)
