"""What the backends of :func:`onnxclp.scale.run_tasks` share: the outcome and resource types, the per-worker
state a task reads (:func:`get_shared`, :func:`worker_threads`), the task wrapper, the progress counter and the
default worker count. The local pool (:mod:`onnxclp.scale.executor`) and the Ray backend
(:mod:`onnxclp.scale._ray`) both import this module; neither imports the other's internals.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from onnxclp.errors import OnnxclpError

R = TypeVar("R")

#: The error line of a task whose worker process died (os._exit, a signal such as SIGKILL from the OOM killer,
#: a segfault in native code). The same text on every backend so that outcome lists compare equal.
CRASHED = "worker process died while running this task (killed by a signal, os._exit or a crash in native code)"

#: Memory budget assumed per local worker when choosing the default worker count. Measured (docs/scale.md): a
#: worker scanning a 47 MB ResNet-18 peaks at 147 MB (~60 MB + 2 x the model file); evaluating a CIFAR ResNet-18
#: at batch 256 peaks at 0.7-1.0 GB (session, arena, activations).
DEFAULT_WORKER_MEMORY = 1 << 30

ProgressArg = bool | Callable[[int, int], None] | None

# Per-worker state, set by the pool initializer, by the Ray task wrapper, or by the in-process backend.
_SHARED: dict[str, Any] | None = None
_THREADS: int | None = None


@dataclass(frozen=True)
class TaskOutcome(Generic[R]):
    """The result of one item: ``value`` when ``ok``, else ``error`` (one printable line).

    ``attempts`` counts the runs of the item: more than 1 only when a run killed its worker process and the item
    was retried (an exception raised by the task is deterministic and never retried).
    """

    index: int
    ok: bool
    value: R | None = None
    error: str | None = None
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``value`` as the task returned it)."""
        return {"index": self.index, "ok": self.ok, "value": self.value, "error": self.error, "attempts": self.attempts}


@dataclass(frozen=True)
class TaskResources:
    """What one task asks of a Ray node. ``num_gpus=None``: 1 GPU when the cluster has GPUs, else none.

    ``memory`` (bytes, optional) is handed to Ray's scheduler as a logical reservation. The local pool ignores
    these: its concurrency is ``workers``, and :class:`onnxclp.scale.SessionCache` picks CUDA when present.
    """

    num_cpus: float = 1.0
    num_gpus: float | None = 0.0
    memory: int | None = None

    @classmethod
    def auto(cls, num_cpus: float = 1.0, memory: int | None = None) -> TaskResources:
        """One GPU per task where the cluster has GPUs, none elsewhere (decided once connected)."""
        return cls(num_cpus=num_cpus, num_gpus=None, memory=memory)

    def resolve(self, cluster: dict[str, float]) -> TaskResources:
        """Concrete resources for a cluster whose ``ray.cluster_resources()`` is ``cluster``."""
        if self.num_gpus is not None:
            return self
        return TaskResources(self.num_cpus, 1.0 if cluster.get("GPU", 0) > 0 else 0.0, self.memory)


def error_line(exc: BaseException) -> str:
    """One printable line for an exception: an OnnxclpError's message, else ``Type: first line``."""
    if isinstance(exc, OnnxclpError):
        text = exc.message
    else:
        lines = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    text = "".join(ch if ch.isprintable() else " " for ch in " ".join(text.split()))
    return text if len(text) <= 500 else text[:497] + "..."


def get_shared() -> dict[str, Any]:
    """The ``shared`` dict given to :func:`run_tasks`, from inside a task ({} when none was given).

    Locally it arrived once per worker process (pool initializer); on Ray it is the object-store value of the
    one ``ray.put`` (numpy arrays in it are zero-copy, read-only views).
    """
    return _SHARED if _SHARED is not None else {}


def worker_threads() -> int | None:
    """Threads one task may use (cores / workers in a local pool; Ray's OMP_NUM_THREADS on Ray), or None."""
    if _THREADS is not None:
        return _THREADS
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def invoke(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any, str | None]:
    """Run one task; an exception becomes an error line (so that it crosses process boundaries as text)."""
    try:
        return True, fn(item), None
    except Exception as exc:
        return False, None, error_line(exc)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available to new processes: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
            try:
                avail = os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
                break
            except (ValueError, OSError, AttributeError):
                continue
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            room = max(0, int(limit) - used)
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def default_workers(memory_per_worker: int = DEFAULT_WORKER_MEMORY) -> int:
    """The machine's usable cores, capped so that ``memory_per_worker`` bytes fit in the available memory."""
    cpus = usable_cpus()
    avail = available_memory()
    if avail is not None and memory_per_worker > 0:
        cpus = min(cpus, max(1, avail // memory_per_worker))
    return max(1, cpus)


class Progress:
    """Completed-task reporting: a callback ``(done, total)``, or a counter on stderr."""

    def __init__(self, progress: ProgressArg, total: int) -> None:
        self.total = total
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.callback: Callable[[int, int], None] | None = None
        if callable(progress):
            self.callback = progress
        elif progress is True or (progress is None and self.tty):
            self.callback = self._print

    def _print(self, done: int, total: int) -> None:
        if self.tty:
            sys.stderr.write(f"\r{done}/{total} tasks done" + ("\n" if done == total else ""))
        elif done == total or done % max(1, total // 10) == 0:
            sys.stderr.write(f"{done}/{total} tasks done\n")
        sys.stderr.flush()

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


def set_shared(shared: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set what :func:`get_shared` returns in this process; returns the previous value."""
    global _SHARED
    saved, _SHARED = _SHARED, shared
    return saved


def set_threads(threads: int | None) -> None:
    """Set what :func:`worker_threads` returns in this process (a local pool worker's thread budget)."""
    global _THREADS
    _THREADS = threads
