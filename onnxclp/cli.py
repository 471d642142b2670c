"""Command-line interface: a thin Typer shell over the Python API.

Parses options, calls :mod:`onnxclp.api`, prints, and maps :class:`~onnxclp.errors.OnnxclpError`
to exit codes. Heavy modules (torch, onnxruntime) are only imported inside the commands that need them.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="onnxclp",
    help="Data-free backdoor removal (CLP, LPP) for ONNX models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point."""
    app()


def _register_eval_commands() -> None:
    # evaluate / compare live in onnxclp.eval; their module imports nothing heavy at top level.
    try:
        from onnxclp.eval.cli import register
    except ImportError:  # pragma: no cover - eval package not present
        return
    register(app)


_register_eval_commands()
