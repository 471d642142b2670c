"""Option text the library and the command line both read: comma-separated numbers (``R,G,B``, ``C,H,W``).

No heavy import and nothing of the CLI: library modules (a study, a pass) parse the same text the CLI does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from onnxclp.errors import OnnxclpError

T = TypeVar("T")


def numbers(text: str, what: str, cast: Callable[[str], T]) -> list[T]:
    """``text`` split at commas, each part cast; ``what`` (the option) names a bad value in the error."""
    try:
        return [cast(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OnnxclpError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def parse_numbers(text: str | None, what: str) -> list[float] | None:
    """``R,G,B``-style option text as floats (None stays None)."""
    return None if text is None else numbers(text, what, float)
