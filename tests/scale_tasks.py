"""Tasks for tests/test_scale.py: module-level functions, importable by spawned pool workers (the test's
sys.path travels with spawn) and pickled by value for Ray workers (the test module registers this module)."""

from __future__ import annotations

import os
import time
from typing import Any

from onnxclp.scale import get_shared


def square(x: int) -> int:
    """x²; raises for 3 (an ordinary task failure)."""
    if x == 3:
        raise ValueError("three is not allowed\nsecond line")
    return x * x


def die_on_two(x: int) -> int:
    """Kills its worker process for 2 (as a segfault or the OOM killer would); x + 1 otherwise."""
    if x == 2:
        os._exit(1)
    time.sleep(0.05)
    return x + 1


def shared_stats(x: int) -> dict[str, Any]:
    """Reads the shared dict: the test set's sum plus x, and whether its array is writeable."""
    images = get_shared()["images"]
    return {"x": x, "total": float(images.sum()) + x, "writeable": bool(images.flags.writeable)}


def sleep_for(seconds: float) -> float:
    """Sleeps (stands for a long task that Ctrl-C should cancel)."""
    time.sleep(seconds)
    return seconds


def scan_report(path: str) -> dict[str, Any]:
    """The JSON report of ``onnxclp.scan(path)`` without timings."""
    import onnxclp

    return onnxclp.scan(path).to_dict(timings=False)


def worker_pid(x: int) -> int:
    """The id of the process that ran the task."""
    time.sleep(0.02)
    return os.getpid()


def die_on_two_and_three(x: int) -> int:
    """Kills its worker for 2 and for 3 (two culprits in flight at once on 2 workers); x + 1 otherwise."""
    if x in (2, 3):
        time.sleep(0.05)
        os._exit(1)
    time.sleep(0.05)
    return x + 1
