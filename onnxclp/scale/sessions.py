"""One onnxruntime session per model per worker process, reused by every task that evaluates that model.

Building a session costs far more than a CIFAR-size batch (graph optimisation, memory arenas, CUDA context), so
a grid's cells that share a model should share its session. :class:`SessionCache` is an LRU of a few
:class:`onnxclp.eval.runner.OnnxClassifier` objects (the safe loader's checks, then CUDA-then-CPU providers),
keyed by the model file's resolved path, size and mtime; :func:`session_cache` is the process-wide instance a
task uses. The same code serves the local pool (one cache per worker process, alive for the pool's lifetime)
and Ray (Ray keeps its worker processes between tasks, so the module-level cache outlives a task). See
docs/scale.md for why this is a per-process cache rather than a pool of actors.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

from onnxclp.scale.tasks import worker_threads

#: Sessions kept per process. A CIFAR ResNet's session is ~10-50 MB; an ImageNet ResNet-50's ~200-400 MB.
DEFAULT_SESSIONS = 4


class SessionCache:
    """LRU of onnxruntime classifiers, one per (model file, device, layout, threads).

    ``device``: ``auto`` (CUDA with CPU fallback when onnxruntime has CUDA, else CPU), ``cpu`` or ``cuda``, as
    ``onnxclp evaluate --device``. ``threads``: intra-op threads per session; default :func:`worker_threads`
    (cores / workers in a local pool, Ray's OMP_NUM_THREADS on Ray) so N workers do not oversubscribe the CPU.
    """

    def __init__(self, max_size: int = DEFAULT_SESSIONS, device: str = "auto", threads: int | None = None) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        self.max_size = max_size
        self.device = device
        self.threads = threads
        self.built = 0  # sessions built by this cache (a test and the bench read it)
        self._entries: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def _key(self, path: str | os.PathLike[str], layout: str | None) -> tuple[Any, ...]:
        real = Path(path).resolve()
        st = real.stat()
        return (str(real), st.st_size, st.st_mtime_ns, self.device, layout, self.threads or worker_threads())

    def get(self, path: str | os.PathLike[str], layout: str | None = None) -> Any:
        """The :class:`~onnxclp.eval.runner.OnnxClassifier` of ``path`` (built on first use, then reused)."""
        key = self._key(path, layout)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        from onnxclp.eval.runner import OnnxClassifier

        entry = OnnxClassifier(key[0], device=self.device, layout=layout, threads=key[5])
        self.built += 1
        self._entries[key] = entry
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)
        return entry

    def session(self, path: str | os.PathLike[str]) -> Any:
        """The bare ``onnxruntime.InferenceSession`` of ``path``."""
        return self.get(path).session

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every session (their memory is freed when no task holds them)."""
        self._entries.clear()


_CACHE: SessionCache | None = None


def session_cache() -> SessionCache:
    """This process's cache (one per worker process; created on first use)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = SessionCache()
    return _CACHE
