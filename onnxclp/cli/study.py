"""The ``sweep`` and ``tac`` commands (added to the main app by :func:`register`), and the bodies of
``scan --plot`` and ``sanitize --calibrate``.

Nothing heavy is imported at load time: torch, onnxruntime and matplotlib load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from onnxclp.cli.common import check_writable, require_extra, run_guarded
from onnxclp.cli.options import DebugOpt, RayOpt, RunArgs, WorkersOpt, with_method_options, with_run_options
from onnxclp.errors import OnnxclpError

__all__ = ["register", "sweep_command", "tac_command"]

UGrid = Annotated[
    str, typer.Option("--u", "-u", help="Values of u: START:STOP:STEP (inclusive) or a comma-separated list.")
]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write the figure (PNG) here (needs matplotlib).")]
JsonPath = Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")]


def _start(run: RunArgs, model: Path, json_path: Path | None, plot: Path | None) -> tuple[Any, Any]:
    """Check the extras and the outputs before any work, then load the model and prepare the data once."""
    check_writable(json_path, "JSON results")
    check_writable(plot, "plot")
    options = run.options(prefetch=0)
    if plot is not None:
        require_extra("eval", "matplotlib")
    from onnxclp.study.measure import load_inline, prepare

    proto = load_inline(model)
    return proto, prepare(proto, run.data, options=options)


def _write(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OnnxclpError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _echo_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


@with_method_options(skip=("u",))
@with_run_options()
def sweep_command(
    model: Annotated[Path, typer.Argument(help="ONNX classifier (backdoored).", show_default=False)],
    run: RunArgs,
    method_values: dict[str, Any],
    method: str = "clp",
    score: str | None = None,
    include_fc: bool | None = None,
    u: UGrid = "0.5:8:0.5",
    plot: PlotOpt = None,
    json_path: JsonPath = None,
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    debug: DebugOpt = False,
) -> None:
    """ACC, ASR and the fraction of channels pruned against u (sanitized in memory for each u)."""

    def go() -> None:
        from onnxclp.study.sweep import parse_grid, sweep

        us = parse_grid(u)
        fixed = {k: v for k, v in {**method_values, "score": score, "include_fc": include_fc}.items() if v is not None}
        if ray is not None or (workers is not None and workers > 1):  # one cell per u: onnxclp.study.grid
            from onnxclp.study.grid import sweep_parallel

            check_writable(json_path, "JSON results")
            check_writable(plot, "plot")
            if plot is not None:
                require_extra("eval", "matplotlib")
            options = run.options(prefetch=0)
            result = sweep_parallel(
                model, run.data, options, us, method, fixed=fixed, name=str(model), workers=workers, ray=ray
            )
        else:
            proto, prepared = _start(run, model, json_path, plot)
            result = sweep(proto, prepared, us, method, name=str(model), **fixed)
        typer.echo(
            f"{model}: {method} on {result.n_samples} samples ({result.n_attacked} attacked, {result.attack['attack']})"
        )
        _echo_table(result.table(["u"]))
        _write(json_path, result.to_json())
        if plot is not None:
            from onnxclp.study.plots import plot_sweep

            typer.echo(f"wrote {plot_sweep(result, plot)}", err=True)

    run_guarded(go, debug)


@with_method_options()
@with_run_options(batch_size=64)
def tac_command(
    model: Annotated[Path, typer.Argument(help="ONNX classifier (backdoored).", show_default=False)],
    run: RunArgs,
    method_values: dict[str, Any],
    method: str = "clp",
    score: str | None = None,
    include_fc: bool | None = None,
    plot: PlotOpt = None,
    json_path: JsonPath = None,
    debug: DebugOpt = False,
) -> None:
    """Trigger-activated change per channel (CLP paper 4.2) beside each channel's score and the decision."""

    def go() -> None:
        from onnxclp.study.tac import tac

        proto, prepared = _start(run, model, json_path, plot)
        given = {**method_values, "score": score, "include_fc": include_fc}
        params = {k: v for k, v in given.items() if v is not None}
        result = tac(proto, prepared, method, name=str(model), **params)
        rows = [["layer", "ch", "rho", "top ch", "TAC/median", "score z", "pruned"]]
        for layer in result.layers:
            if layer.role == "output":
                continue
            t = layer.top()
            rho = layer.rho
            rows.append(
                [
                    layer.node, str(layer.channels), "n/a" if rho is None else f"{rho:.2f}", str(t["channel"]),
                    f"{t['tac_over_median']:.1f}", f"{t['score_z']:+.2f}", "yes" if t["pruned"] else "no",
                ]
            )  # fmt: skip
        from onnxclp.render import report_title
        from onnxclp.report import Report

        title = report_title(Report(result.method, result.params)).removeprefix("onnxclp ")  # the method's own
        typer.echo(f"{model}: TAC on {result.n_images} attacked images; {title}")
        _echo_table(rows)
        s = result.summary()
        typer.echo(
            f"highest-TAC channel pruned in {s['layers_top_tac_pruned']} of {s['layers']} layers; "
            f"{s['strongest_pruned']} of the {len(s['strongest'])} most trigger-sensitive channels pruned; "
            f"median rho {s['median_rho']:.2f}"
        )
        _write(json_path, result.to_json())
        if plot is not None:
            from onnxclp.study.plots import plot_tac

            for p in plot_tac(result, plot):
                typer.echo(f"wrote {p}", err=True)

    run_guarded(go, debug)


def register(app: typer.Typer) -> None:
    """Add the ``sweep`` and ``tac`` commands to ``app``."""
    app.command("sweep")(sweep_command)
    app.command("tac")(tac_command)
