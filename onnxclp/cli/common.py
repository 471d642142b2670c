"""What every command shares: one error policy, the extras' install hints, output writing (the options are
:mod:`onnxclp.cli.options`).

Error policy (README, "Exit codes"): a user error (:class:`~onnxclp.errors.OnnxclpError`) prints one printable
line ``error: ...`` on stderr and exits with its code (2 unless said otherwise); anything else is a bug in
onnxclp (exit 4); a traceback only with ``--debug``. No heavy module is imported here.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer

from onnxclp.errors import EXIT_INTERNAL, OnnxclpError

T = TypeVar("T")


def one_line(text: str) -> str:
    """A message as one printable line: newlines, escape sequences and other control characters from a hostile
    file (names, paths) are shown escaped, never sent to the terminal or split into lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def run_guarded(fn: Callable[[], T], debug: bool) -> T:
    """Run ``fn``; turn errors into one line on stderr and an exit code (traceback only with ``--debug``)."""
    try:
        return fn()
    except typer.Exit:
        raise
    except OnnxclpError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {one_line(exc.message)}", err=True)
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
        message = one_line(f"{type(exc).__name__}: {exc}")
        typer.echo(f"internal error: {message} (a bug in onnxclp; rerun with --debug)", err=True)
        raise typer.Exit(EXIT_INTERNAL) from None


# The README's install routes ("Quick start"): torch first, the build for the machine; from PyPI alone torch is the
# multi-GB CUDA build, so a CPU-only machine takes PyTorch's CPU index. onnxruntime-gpu replaces onnxruntime.
TORCH_ROUTES = (
    "install torch for this machine first (README, 'Quick start'): without an NVIDIA GPU, "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install 'onnxclp[{extra}]'; "
    "with one, pip install torch && pip install 'onnxclp[eval-gpu]'"
)


def extra_hint(extra: str) -> str:
    """How to install ``extra``: the README's CPU/GPU routes for the extras that bring torch, else plain pip."""
    if extra in ("eval", "eval-gpu"):
        return TORCH_ROUTES.format(extra=extra)
    return f"pip install 'onnxclp[{extra}]'"


def require_extra(extra: str, *modules: str) -> None:
    """Refuse, with one line naming the extra to install (exit 2), when one of ``modules`` cannot be imported."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxclpError(f"this needs the '{extra}' extra ({', '.join(missing)} not installed): {extra_hint(extra)}")


def write_text(target: str | Path, text: str, what: str = "output") -> None:
    """Write ``text`` to a file, or to stdout when ``target`` is ``-``."""
    if str(target) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        Path(target).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OnnxclpError(f"{target}: cannot write the {what} ({exc.strerror or exc})") from exc


def check_writable(target: str | Path | None, what: str = "output") -> None:
    """Refuse an output path before any work is done: a folder, or a file in a folder that does not exist."""
    if target is None or str(target) == "-":
        return
    p = Path(target)
    if p.is_dir():
        raise OnnxclpError(f"{p}: is a directory (the {what} needs a file name)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxclpError(f"{p}: folder {parent} does not exist (the {what} cannot be written)")
