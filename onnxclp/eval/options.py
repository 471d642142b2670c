"""The options of a run (evaluate, compare, sweep, tac, calibration) and the one device rule.

Nothing heavy is imported here (no torch, no onnxruntime): the CLI builds a :class:`RunOptions` before it
knows whether the ``eval`` extra is installed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnxclp.errors import OnnxclpError

__all__ = ["DEVICES", "RunOptions", "resolve_device"]

PathLike = str | os.PathLike[str]
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: Any) -> str:
    """The one device rule: ``auto``, ``cpu`` or ``cuda``, case-insensitive (a string or the CLI's ``Device``
    enum); anything else is a usage error (never a silent fallback to the CPU)."""
    value = getattr(device, "value", device)
    if not isinstance(value, str) or value.strip().lower() not in DEVICES:
        raise OnnxclpError(f"--device must be one of {', '.join(DEVICES)}, got {value!r}")
    return value.strip().lower()


@dataclass
class RunOptions:
    """How a model is run over a data set: the attack, the data and input handling, batching and device.

    ``attack``: an attack name (``none``, ``badnets``... ``onnxclp.eval.attacks.ATTACKS``), an ``Attack`` or an
    ``AttackConfig``; ``attack_config`` a JSON file (the trainer's), which ``params``/``target``/``mode``/
    ``seed``/``mean``/``std`` override. ``limit`` draws that many samples with the attack's seed; ``indices``
    picks samples explicitly instead. ``device`` follows :func:`resolve_device`; ``threads`` sets onnxruntime's
    intra-op threads; ``prefetch`` batches are prepared ahead on a background thread (0: none).
    """

    attack: Any = None
    params: Mapping[str, Any] | None = None
    attack_config: PathLike | None = None
    target: int | None = None
    mode: str | None = None
    seed: int | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    layout: str | None = None
    input_size: Sequence[int] | None = None
    limit: int | None = None
    indices: Sequence[int] | None = None
    batch_size: int = 256
    device: str = "auto"
    threads: int | None = None
    x_key: str | None = None
    y_key: str | None = None
    prefetch: int = 2
    progress: bool = False

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OnnxclpError(f"--batch-size must be >= 1, got {self.batch_size!r}")
        if self.limit is not None and self.limit < 1:
            raise OnnxclpError(f"--limit must be >= 1, got {self.limit}")
        if self.threads is not None and self.threads < 1:
            raise OnnxclpError(f"--threads must be >= 1, got {self.threads}")

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with ``changes``; an unknown name is a TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, options: RunOptions | None = None, **changes: Any) -> RunOptions:
        """``options`` (or the defaults) with ``changes`` applied: what every Python entry point accepts."""
        return (options or cls()).replace(**changes)
