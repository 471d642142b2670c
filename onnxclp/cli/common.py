"""What every command shares: one error policy, the options built from the method registry, output writing.

Error policy (README, "Exit codes"): a user error (:class:`~onnxclp.errors.OnnxclpError`) prints one printable
line ``error: ...`` on stderr and exits with its code (2 unless said otherwise); anything else is a bug in
onnxclp (exit 4); a traceback only with ``--debug``. No heavy module is imported here.
"""

from __future__ import annotations

import functools
import inspect
import sys
import traceback
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from onnxclp.errors import EXIT_INTERNAL, OnnxclpError

T = TypeVar("T")

METHOD_PANEL = "Method"


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


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ReportFormat(str, Enum):
    """``sanitize --report-format``: the formats a report file can take (text is the terminal's)."""

    json = "json"
    sarif = "sarif"


Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the summary line.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="List every layer, even on large models.")]
DeviceOpt = Annotated[
    Device,
    typer.Option("--device", case_sensitive=False, help="auto (CUDA when onnxruntime has it), cpu or cuda."),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", help="Regex on layer or weight names to leave alone (repeatable).", rich_help_panel=METHOD_PANEL
    ),
]
Streams = Annotated[
    str,
    typer.Option(
        "--streams",
        metavar="RULE",
        help="Residual-stream rule: strongest (a channel summed into one stream is pruned in its most outlying "
        "layer only) or all (every layer decides alone).",
        rich_help_panel=METHOD_PANEL,
    ),
]
InlineFunctions = Annotated[
    bool,
    typer.Option(
        "--inline-functions",
        help="Inline model-local functions first so the layers inside them are scored.",
        rich_help_panel=METHOD_PANEL,
    ),
]


def _method_help() -> str:
    from onnxclp import methods

    return f"Defence: {', '.join(methods.names())}; `onnxclp methods` describes each and what it needs."


def method_option(default: str = "clp") -> inspect.Parameter:
    """``--method/-m``, its help listing every registered method."""
    return inspect.Parameter(
        "method",
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[
            str,
            typer.Option("--method", "-m", metavar="NAME", help=_method_help(), rich_help_panel=METHOD_PANEL),
        ],
    )


def method_parameters(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One CLI option per parameter any registered method declares (``--u``, ``--u-low``...), plus ``--score``
    and ``--include-fc``; each help names the methods that take it and their defaults."""
    from onnxclp import methods, scoring

    out = []
    for name, spec in methods.all_params().items():
        if name in exclude:
            continue
        takers = [m for m in methods.names() if methods.get(m).spec(name) is not None]
        defaults = ", ".join(f"{m} {methods.get(m).spec(name).default}" for m in takers)  # type: ignore[union-attr]
        defaults = (
            f"(default: {defaults})"
            if len(takers) > 1
            else f"({takers[0]} only; default {methods.get(takers[0]).spec(name).default})"
        )  # type: ignore[union-attr]
        decls = [spec.flag] + ([spec.short] if spec.short else [])
        out.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[
                    spec.type | None,
                    typer.Option(*decls, help=f"{spec.help} {defaults}", rich_help_panel=METHOD_PANEL),
                ],
            )
        )
    score_help = "Channel score: " + ", ".join(scoring.names()) + " (default: the method's)."
    out.append(
        inspect.Parameter(
            "score",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option("--score", help=score_help, rich_help_panel=METHOD_PANEL)],
        )
    )
    out.append(
        inspect.Parameter(
            "include_fc",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                bool | None,
                typer.Option(
                    "--include-fc/--no-include-fc",
                    help="Score hidden fully connected layers (default: the method's).",
                    rich_help_panel=METHOD_PANEL,
                ),
            ],
        )
    )
    return out


def with_method_options(*, skip: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add ``--method`` and every registry parameter to a command. The command receives them in a
    ``method_values`` dict (only the options given, None left out) beside ``method``, ``score``, ``include_fc``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        from onnxclp import methods

        names = [n for n in methods.all_params() if n not in skip]
        sig = inspect.signature(fn, eval_str=True)
        replaced = {"method_values", "method", "score", "include_fc"}  # built from the registry below
        own = [p for p in sig.parameters.values() if p.name not in replaced]
        added = [method_option(), *method_parameters(skip)]
        params = sorted([*own, *added], key=lambda p: p.default is not inspect.Parameter.empty)
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names}
            return fn(method_values={k: v for k, v in values.items() if v is not None}, **kwargs)

        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command

    return wrap
