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
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from onnxclp.errors import OnnxclpError
from onnxclp.scale.tasks import (  # re-exported: onnxclp.scale.executor was their home
    CRASHED,
    DEFAULT_WORKER_MEMORY,
    ProgressArg,
    TaskOutcome,
    TaskResources,
    available_memory,
    default_workers,
    error_line,
    get_shared,
    set_shared,
    set_threads,
    usable_cpus,
    worker_threads,
)
from onnxclp.scale.tasks import Progress as _Progress
from onnxclp.scale.tasks import invoke as _invoke

T = TypeVar("T")
R = TypeVar("R")

# Not fork: the parent may hold onnxruntime/torch/OpenBLAS threads. forkserver where the OS has it: a single-
# threaded server that has imported onnxclp forks each worker in milliseconds (spawn: ~1 s of imports per worker,
# paid again each time the pool is rebuilt after a crash). spawn elsewhere (Windows).
_PRELOAD = ["onnxclp.scale.executor"]
_preloaded = False

__all__ = [
    "CRASHED",
    "DEFAULT_WORKER_MEMORY",
    "ProgressArg",
    "TaskOutcome",
    "TaskResources",
    "available_memory",
    "default_workers",
    "error_line",
    "get_shared",
    "run_tasks",
    "usable_cpus",
    "worker_threads",
]


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
    saved = set_shared(shared)
    outcomes: list[TaskOutcome[Any]] = []
    try:
        for i, item in enumerate(items):
            ok, value, error = _invoke(fn, item)
            outcomes.append(TaskOutcome(i, ok, value, error, 1))
            report.step()
    finally:
        set_shared(saved)
    return outcomes


def _init_worker(shared: dict[str, Any] | None, threads: int) -> None:
    """Pool initializer: the shared dict (once per worker), a thread budget, SIGINT left to the parent."""
    set_shared(shared)
    set_threads(threads)
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
