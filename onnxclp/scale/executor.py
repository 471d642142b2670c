"""Run one function over many items: in-process, in a local process pool, or on a Ray cluster.

:func:`run_tasks` is the one entry point. The three backends give the same :class:`TaskOutcome` list (same
order, same values, same error lines, same attempt counts) for deterministic tasks; the tests check exactly that.

Nothing here writes a file: a caller that writes outputs does so from the returned outcomes, after
:func:`run_tasks` returned, so an interrupted run (Ctrl-C) leaves no partial output behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from onnxclp.errors import OnnxclpError

T = TypeVar("T")
R = TypeVar("R")

#: The error line of a task whose worker process died (os._exit, a signal such as SIGKILL from the OOM killer,
#: a segfault in native code). The same text on every backend so that outcome lists compare equal.
CRASHED = "worker process died while running this task (killed by a signal, os._exit or a crash in native code)"

#: Memory budget assumed per local worker when choosing the default worker count. Measured (docs/scale.md): a
#: worker scanning a 47 MB ResNet-18 peaks at 147 MB (~60 MB + 2 x the model file); evaluating a CIFAR ResNet-18
#: at batch 256 peaks at 0.7-1.0 GB (session, arena, activations).
DEFAULT_WORKER_MEMORY = 1 << 30

ProgressArg = bool | Callable[[int, int], None] | None

# Not fork: the parent may hold onnxruntime/torch/OpenBLAS threads. forkserver where the OS has it: a single-
# threaded server that has imported onnxclp forks each worker in milliseconds (spawn: ~1 s of imports per worker,
# paid again each time the pool is rebuilt after a crash). spawn elsewhere (Windows).
_PRELOAD = ["onnxclp.scale.executor"]
_preloaded = False

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


def _invoke(fn: Callable[[Any], Any], item: Any) -> tuple[bool, Any, str | None]:
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


class _Progress:
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


def run_tasks(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int | None = None,
    ray: str | None = None,
    retries: int = 1,
    progress: ProgressArg = False,
    resources: TaskResources | None = None,
    shared: dict[str, Any] | None = None,
) -> list[TaskOutcome[R]]:
    """``fn(item)`` for every item; one :class:`TaskOutcome` per item, in input order.

    - ``ray=None``, ``workers=1``: in this process, no isolation (a task that kills its process kills the caller).
    - ``ray=None``, ``workers=N``: a forkserver (Windows: spawn) pool of N workers, default :func:`default_workers`.
      A task that raises gives an error entry; a task that kills its worker gives an error entry after
      ``retries`` more attempts, the pool is rebuilt and the other items complete.
    - ``ray="local"`` (a local Ray instance of ``workers`` CPUs, started and shut down here), ``"auto"``
      (RAY_ADDRESS / the running cluster) or a cluster address: Ray tasks, same outcomes.

    ``fn`` must be importable by the workers (a module-level function); items should be small (model *paths* on
    shared storage, not protos). ``shared`` (e.g. a test set as numpy arrays) reaches every task through
    :func:`get_shared`: once per local worker, or one ``ray.put``. ``progress``: a ``(done, total)`` callback,
    True for a stderr counter, None for a counter only when stderr is a terminal. ``KeyboardInterrupt`` cancels
    the pending tasks, stops the workers and is re-raised. Nothing is written to disk.
    """
    if retries < 0:
        raise OnnxclpError(f"retries must be >= 0, got {retries}")
    if workers is not None and workers < 1:
        raise OnnxclpError(f"--workers must be at least 1, got {workers}")
    items = list(items)
    report = _Progress(progress, len(items))
    if ray is not None:
        from onnxclp.scale import _ray

        return _ray.run_ray(
            fn, items, address=ray, workers=workers, retries=retries, resources=resources, shared=shared, report=report
        )
    if not items:
        return []
    n_workers = workers if workers is not None else default_workers()
    if n_workers == 1:
        return _run_inline(fn, items, shared, report)
    return _run_pool(fn, items, min(n_workers, len(items)), retries, shared, report)


def _run_inline(
    fn: Callable[[Any], Any], items: list[Any], shared: dict[str, Any] | None, report: _Progress
) -> list[TaskOutcome[Any]]:
    global _SHARED
    saved, _SHARED = _SHARED, shared
    outcomes: list[TaskOutcome[Any]] = []
    try:
        for i, item in enumerate(items):
            ok, value, error = _invoke(fn, item)
            outcomes.append(TaskOutcome(i, ok, value, error, 1))
            report.step()
    finally:
        _SHARED = saved
    return outcomes


def _init_worker(shared: dict[str, Any] | None, threads: int) -> None:
    """Pool initializer: the shared dict (once per worker), a thread budget, SIGINT left to the parent."""
    global _SHARED, _THREADS
    _SHARED = shared
    _THREADS = threads
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mp_context() -> Any:
    """forkserver (preloading onnxclp) where available, else spawn."""
    global _preloaded
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    if not _preloaded:  # effective only before the server's first start; harmless after
        ctx.set_forkserver_preload(_PRELOAD)
        _preloaded = True
    return ctx


def _new_pool(workers: int, shared: dict[str, Any] | None) -> cf.ProcessPoolExecutor:
    threads = max(1, usable_cpus() // workers)
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=_mp_context(),
        initializer=_init_worker,
        initargs=(shared, threads),
    )


def _kill_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started and stop the workers now (Ctrl-C): running tasks are not waited for."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(timeout=5)


def _run_pool(
    fn: Callable[[Any], Any],
    items: list[Any],
    workers: int,
    retries: int,
    shared: dict[str, Any] | None,
    report: _Progress,
) -> list[TaskOutcome[Any]]:
    """The local pool. At most ``workers`` tasks are submitted at a time, so when a worker dies the tasks in
    flight are the only suspects: one suspect is charged an attempt; several (the pool kills every worker when
    one dies) are re-run one at a time, so that each crash is charged to the item that caused it."""
    n = len(items)
    results: list[TaskOutcome[Any] | None] = [None] * n
    attempts = [0] * n
    todo: deque[int] = deque(range(n))
    isolate: deque[int] = deque()
    running: dict[cf.Future[Any], int] = {}
    pool: cf.ProcessPoolExecutor | None = None

    def finish(i: int, ok: bool, value: Any, error: str | None) -> None:
        results[i] = TaskOutcome(i, ok, value, error, attempts[i])
        report.step()

    def crashed(i: int, queue: deque[int]) -> None:
        attempts[i] += 1
        if attempts[i] > retries:
            finish(i, False, None, CRASHED)
        else:
            queue.appendleft(i)

    def collect(fut: cf.Future[Any], suspects: list[int]) -> None:
        """Record a finished future, or add its item to the suspects of a broken pool."""
        i = running.pop(fut)
        exc = fut.exception()
        if isinstance(exc, BrokenProcessPool):
            suspects.append(i)
            return
        attempts[i] += 1
        if exc is not None:  # e.g. the item or the result could not be pickled
            finish(i, False, None, error_line(exc))
        else:
            finish(i, *fut.result())

    try:
        while todo or isolate or running:
            if pool is None:
                pool = _new_pool(workers, shared)
            isolated = bool(isolate)
            queue, limit = (isolate, 1) if isolated else (todo, workers)
            submit_failed = False
            while queue and len(running) < limit:
                i = queue.popleft()
                try:
                    running[pool.submit(_invoke, fn, items[i])] = i
                except BrokenProcessPool:  # a worker died while we were submitting: handled below
                    queue.appendleft(i)
                    submit_failed = True
                    break
            suspects: list[int] = []
            if running:
                done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    collect(fut, suspects)
            if not suspects and not submit_failed:
                continue
            # The pool is broken: every other future fails too (or has just succeeded); collect them all.
            for fut in list(running):
                collect(fut, suspects)
            pool.shutdown(wait=True)
            pool = None
            if len(suspects) == 1:
                crashed(suspects[0], isolate if isolated else todo)
            elif suspects:
                isolate.extend(sorted(suspects))
    except BaseException:
        if pool is not None:
            _kill_pool(pool)
            pool = None
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return [r for r in results if r is not None]
