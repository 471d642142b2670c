"""Scale-out: one function over many models or grid cells, in a local process pool or on a Ray cluster.

``ray`` is imported only when ``run_tasks(..., ray=...)`` asks for it (the optional ``scale`` extra).
See docs/scale.md.
"""

from __future__ import annotations

from onnxclp.scale.executor import (
    CRASHED,
    DEFAULT_WORKER_MEMORY,
    TaskOutcome,
    TaskResources,
    available_memory,
    default_workers,
    error_line,
    get_shared,
    run_tasks,
    usable_cpus,
    worker_threads,
)
from onnxclp.scale.sessions import SessionCache, session_cache

__all__ = [
    "CRASHED",
    "DEFAULT_WORKER_MEMORY",
    "SessionCache",
    "TaskOutcome",
    "TaskResources",
    "available_memory",
    "default_workers",
    "error_line",
    "get_shared",
    "run_tasks",
    "session_cache",
    "usable_cpus",
    "worker_threads",
]
