"""The ``grid`` command: an evaluation grid (models × methods × parameters × attacks) from one config file.

The logic is :mod:`onnxclp.study.grid`; this module parses the options, prints the table and writes the JSON
(atomically, after every cell has run: an interrupted run leaves no partial output file).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from onnxclp.cli.common import check_writable, one_line, require_extra, run_guarded
from onnxclp.cli.options import Debug, DeviceOpt, RayOpt, WorkersOpt

__all__ = ["grid_command", "register"]


def echo_table(rows: list[list[str]], err: bool = False) -> None:
    """Right-aligned columns, one line per row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo(one_line("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip()), err=err)


def grid_command(
    config: Annotated[
        Path, typer.Argument(help="Grid config, JSON or YAML (docs/scale.md, 'Grid').", show_default=False)
    ],
    data: Annotated[Path | None, typer.Option("--data", help="Test data (overrides the config's 'data').")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Samples drawn (overrides the config's).")] = None,
    clean_data: Annotated[
        Path | None,
        typer.Option(
            "--clean-data",
            help="Clean labelled images for every method cell: the few-shot methods' data and the accuracy "
            "guard's validation part (overrides the config's 'clean_data' path).",
        ),
    ] = None,
    clean_n: Annotated[
        int | None, typer.Option("--clean-n", help="Clean images read (overrides every clean_data's 'n').")
    ] = None,
    max_acc_drop: Annotated[
        float | None,
        typer.Option("--max-acc-drop", help="The guard's budget in points (overrides every clean_data's).", min=0.0),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the JSON here ('-': stdout, the table on stderr).")
    ] = None,
    workers: WorkersOpt = None,
    ray: RayOpt = None,
    retries: Annotated[int, typer.Option("--retries", help="Re-runs of a cell whose worker process died.")] = 1,
    device: DeviceOpt | None = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per batch (default 256).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="onnxruntime threads per worker.")] = None,
    timings: Annotated[bool, typer.Option("--timings", help="Add each cell's sanitize_s to the JSON.")] = False,
    progress: Annotated[bool, typer.Option("--progress", help="Count completed cells on stderr.")] = False,
    debug: Debug = False,
) -> None:
    """Sanitize each (model, method, parameters) in memory and measure ACC/ASR under each attack, in a process
    pool (--workers) or on Ray (--ray); with clean data, every method cell gets it and the accuracy guard's
    validation accuracy is recorded (a result it refuses is an error entry). Exit 1 when some cell has an error
    entry."""

    def go() -> int:
        require_extra("eval", "onnxruntime", "torch", "PIL")
        from onnxclp.study import grid

        check_writable(output, "grid JSON")
        spec = grid.parse_config(
            grid.load_config(config),
            config.parent,
            data=data,
            limit=limit,
            device=None if device is None else device.value,
            batch_size=batch_size,
            threads=threads,
            clean_data=clean_data,
            clean_n=clean_n,
            max_acc_drop=max_acc_drop,
        )
        t0 = time.perf_counter()
        cells = grid.run_grid(spec, workers=workers, ray=ray, retries=retries,
                              progress=True if progress else None)  # fmt: skip
        seconds = time.perf_counter() - t0
        to_stdout = output is not None and str(output) == "-"
        echo_table(grid.table(cells), err=to_stdout)
        failed = sum(c["error"] is not None for c in cells)
        typer.echo(
            f"{len(cells)} cells in {seconds:.1f} s ({len(cells) / seconds if seconds else 0:.2f} cells/s)"
            + (f"; {failed} with an error" if failed else ""),
            err=True,
        )
        text = grid.grid_json(spec, cells, timings)
        if to_stdout:
            sys.stdout.write(text)
            sys.stdout.flush()
        elif output is not None:
            grid.write_atomic(output, text)
        return 1 if failed else 0

    code = run_guarded(go, debug)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the ``grid`` command to ``app``."""
    app.command("grid")(grid_command)
