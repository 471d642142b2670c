"""Command-line interface: a thin Typer shell over the Python API, one module per command group.

- :mod:`~onnxclp.cli.core`: ``sanitize``, ``scan``, ``methods``, ``version`` (no torch or onnxruntime at start-up).
- :mod:`~onnxclp.cli.eval`: ``evaluate``, ``compare`` (the ``eval`` extra, imported when they run).
- :mod:`~onnxclp.cli.study`: ``sweep``, ``tac``.
- :mod:`~onnxclp.cli.grid`: ``grid``.
- :mod:`~onnxclp.cli.options`: every option the commands share, declared once.
- :mod:`~onnxclp.cli.common`: the one error policy, install hints and output writing.
"""

from __future__ import annotations

from typing import Annotated

import typer

from onnxclp.cli import core, eval, grid, study

app = typer.Typer(
    name="onnxclp",
    help="Find and remove backdoors in ONNX models (CLP, LPP and the methods `onnxclp methods` lists).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from onnxclp import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Find and remove backdoors in ONNX models."""


core.register(app)
eval.register(app)
study.register(app)
grid.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
