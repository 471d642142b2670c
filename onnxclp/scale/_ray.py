"""The Ray backend of :func:`onnxclp.scale.run_tasks`; ``ray`` is imported only here, only when asked for."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any

from onnxclp.errors import OnnxclpError
from onnxclp.scale.tasks import (
    CRASHED,
    Progress,
    TaskOutcome,
    TaskResources,
    default_workers,
    error_line,
    invoke,
    set_shared,
)

MISSING = "--ray needs the 'scale' extra: pip install 'onnxclp[scale]'"

#: Tasks submitted and not yet collected, at most (a multiple of the cluster's CPUs, at least this many): the
#: driver keeps a bounded window instead of queueing 100,000 tasks on the scheduler at once.
MIN_IN_FLIGHT = 64


def import_ray() -> ModuleType:
    """The ``ray`` module, or the OnnxclpError (exit 2) that names the extra to install."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise OnnxclpError(MISSING) from exc


def _ray_invoke(fn: Callable[[Any], Any], item: Any, shared: dict[str, Any] | None) -> tuple[bool, Any, str | None]:
    """The Ray task. ``shared`` was passed as the ObjectRef of the one ``ray.put``; Ray resolves a top-level
    ObjectRef argument from the node's object store before the call (numpy arrays zero-copy, read-only)."""
    set_shared(shared)
    return invoke(fn, item)


def _crash_types(ray: ModuleType) -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker or node that died under a task: retried, then reported as :data:`CRASHED`."""
    names = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "LocalRayletDiedError")
    return tuple(t for t in (getattr(ray.exceptions, n, None) for n in names) if isinstance(t, type))


def connect(ray: ModuleType, address: str, workers: int | None) -> bool:
    """Connect to (or start) Ray; True when this call started it and must shut it down.

    An already initialised Ray (e.g. a test fixture's) is reused whatever ``address`` says.
    """
    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address == "local":
        # address="local": a new local instance even where RAY_ADDRESS points at a cluster.
        n = workers if workers is not None else default_workers()
        ray.init(address="local", num_cpus=n, include_dashboard=False, **common)
    elif address == "auto":
        ray.init(address="auto", **common)
    else:
        ray.init(address=address, **common)
    return True


def run_ray(
    fn: Callable[[Any], Any],
    items: list[Any],
    *,
    address: str,
    workers: int | None,
    retries: int,
    resources: TaskResources | None,
    shared: dict[str, Any] | None,
    report: Progress,
) -> list[TaskOutcome[Any]]:
    """:func:`onnxclp.scale.run_tasks` on Ray. Retries of crashed tasks are driven from here (each submission
    has ``max_retries=0``) so that ``attempts`` is exact, as in the local pool."""
    ray = import_ray()
    if not items:
        return []
    started = connect(ray, address, workers)
    pending: dict[Any, int] = {}
    try:
        cluster = ray.cluster_resources()
        res = (resources or TaskResources()).resolve(cluster)
        options: dict[str, Any] = {
            "num_cpus": res.num_cpus,
            "num_gpus": res.num_gpus or 0,
            "max_retries": 0,
            "retry_exceptions": False,
        }
        if res.memory:
            options["memory"] = res.memory
        remote = ray.remote(_ray_invoke).options(**options)
        shared_ref = ray.put(shared) if shared is not None else None  # once per run, whatever the task count
        crash = _crash_types(ray)
        window = max(MIN_IN_FLIGHT, 4 * int(cluster.get("CPU", 1)))
        n = len(items)
        results: list[TaskOutcome[Any] | None] = [None] * n
        attempts = [0] * n
        todo: deque[int] = deque(range(n))
        while todo or pending:
            while todo and len(pending) < window:
                i = todo.popleft()
                attempts[i] += 1
                pending[remote.remote(fn, items[i], shared_ref)] = i
            ready, _ = ray.wait(list(pending), num_returns=min(len(pending), 16), timeout=0.2)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    ok, value, error = ray.get(ref)
                except crash:
                    if attempts[i] <= retries:
                        todo.appendleft(i)
                        continue
                    ok, value, error = False, None, CRASHED
                except ray.exceptions.RayError as exc:  # e.g. fn not importable on the cluster
                    ok, value, error = False, None, error_line(exc)
                results[i] = TaskOutcome(i, ok, value, error, attempts[i])
                report.step()
        return [r for r in results if r is not None]
    except BaseException:
        for ref in pending:
            with contextlib.suppress(Exception):  # already finished, or its worker already gone
                ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
