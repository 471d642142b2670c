"""onnxclp.scale: the in-process, process-pool and Ray backends of run_tasks give the same outcomes.

One local Ray instance (2 CPUs) serves the whole module. The Ray tests are skipped where ray is not installed;
CI installs the ``scale`` extra (.ci/run), so they run there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scale_tasks

from onnxclp.errors import OnnxclpError
from onnxclp.scale import (
    CRASHED,
    SessionCache,
    TaskOutcome,
    TaskResources,
    default_workers,
    error_line,
    run_tasks,
    usable_cpus,
)

GOLDEN = sorted(str(p) for p in (Path(__file__).parent / "golden").glob("*.onnx"))


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module; run_tasks(ray="local") reuses it and leaves it running."""
    ray = pytest.importorskip("ray")
    # Ray workers do not see the tests folder on sys.path: ship the task functions by value.
    ray.cloudpickle.register_pickle_by_value(scale_tasks)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(scale_tasks)


BACKENDS = ["pool", "ray"]


def backend_kwargs(backend: str, request: pytest.FixtureRequest) -> dict[str, object]:
    """run_tasks arguments of a backend; "ray" starts the module's Ray instance (or skips without ray)."""
    if backend == "ray":
        request.getfixturevalue("ray_local")
        return {"ray": "local"}
    return {"workers": 2}


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_a_raising_task(backend, request):
    items = list(range(6))
    inline = run_tasks(scale_tasks.square, items, workers=1)
    assert inline[3] == TaskOutcome(3, False, None, "ValueError: three is not allowed", 1)
    assert [o.value for o in inline if o.ok] == [0, 1, 4, 16, 25]
    assert run_tasks(scale_tasks.square, items, **backend_kwargs(backend, request)) == inline


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_crash_is_an_error_entry_and_the_others_complete(backend, request):
    kw = backend_kwargs(backend, request)
    items = list(range(6))
    outcomes = run_tasks(scale_tasks.die_on_two, items, retries=1, **kw)
    assert outcomes[2] == TaskOutcome(2, False, None, CRASHED, 2)  # ran, retried once, reported
    others = [(o.ok, o.value, o.attempts) for o in outcomes if o.index != 2]
    assert others == [(True, i + 1, 1) for i in (0, 1, 3, 4, 5)]
    no_retry = run_tasks(scale_tasks.die_on_two, items, retries=0, **kw)
    assert no_retry[2] == TaskOutcome(2, False, None, CRASHED, 1)
    # Two culprits in flight together: each is charged its own crashes, the innocent items are not.
    two = run_tasks(scale_tasks.die_on_two_and_three, items, retries=1, **kw)
    assert [(o.ok, o.value, o.attempts) for o in two] == [
        (True, 1, 1), (True, 2, 1), (False, None, 2), (False, None, 2), (True, 5, 1), (True, 6, 1)
    ]  # fmt: skip


def test_shared_object_is_put_once(ray_local, monkeypatch):
    images = np.arange(4 * 3 * 8 * 8, dtype=np.float32).reshape(4, 3, 8, 8)
    puts: list[object] = []
    real_put = ray_local.put

    def counting_put(value, *args, **kwargs):
        puts.append(value)
        return real_put(value, *args, **kwargs)

    monkeypatch.setattr(ray_local, "put", counting_put)
    items = list(range(8))
    on_ray = run_tasks(scale_tasks.shared_stats, items, ray="local", shared={"images": images})
    assert len(puts) == 1 and puts[0]["images"] is images  # one put for 8 tasks
    total = float(images.sum())
    # Read-only: the tasks read the object store's copy in place (zero-copy), not a pickled copy per task.
    assert [o.value for o in on_ray] == [{"x": i, "total": total + i, "writeable": False} for i in items]


@pytest.mark.parametrize("workers", [1, 2])
def test_shared_object_reaches_local_workers(workers):
    images = np.ones((2, 3, 4, 4), np.float32)
    outcomes = run_tasks(scale_tasks.shared_stats, range(4), workers=workers, shared={"images": images})
    assert [o.value for o in outcomes] == [{"x": i, "total": 96.0 + i, "writeable": True} for i in range(4)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scanning_golden_exports_is_identical_on_every_backend(backend, request):
    assert len(GOLDEN) >= 4
    inline = run_tasks(scale_tasks.scan_report, GOLDEN, workers=1)
    assert all(o.ok for o in inline), [o.error for o in inline]
    assert inline[0].value == scale_tasks.scan_report(GOLDEN[0])
    assert run_tasks(scale_tasks.scan_report, GOLDEN, **backend_kwargs(backend, request)) == inline


def test_missing_ray_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(OnnxclpError, match=r"pip install 'onnxclp\[scale\]'") as info:
        run_tasks(scale_tasks.square, [1, 2], ray="local")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_keyboard_interrupt_cancels_pending_tasks(backend, request):
    kwargs = backend_kwargs(backend, request)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_tasks(scale_tasks.sleep_for, [0.01, 60.0, 60.0, 60.0], progress=interrupt, **kwargs)
    assert time.monotonic() - start < 30  # the 60 s tasks were cancelled or killed, not waited for


def test_pool_keeps_its_workers_across_tasks():
    pids = {o.value for o in run_tasks(scale_tasks.worker_pid, range(12), workers=2)}
    assert 1 <= len(pids) <= 2  # two processes served the 12 tasks: no new pool per batch


def test_progress_callback_counts_completed_tasks():
    seen: list[tuple[int, int]] = []
    run_tasks(scale_tasks.square, range(4), workers=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_small_pieces():
    assert run_tasks(scale_tasks.square, [], workers=2) == []
    assert 1 <= default_workers() <= usable_cpus()
    assert default_workers(memory_per_worker=1 << 60) == 1
    assert error_line(OnnxclpError("bad model\nmore")) == "bad model more"
    assert TaskResources.auto().resolve({"CPU": 16.0, "GPU": 2.0}).num_gpus == 1.0
    assert TaskResources.auto().resolve({"CPU": 16.0}).num_gpus == 0.0
    assert TaskResources(num_gpus=0.5).resolve({"CPU": 16.0}).num_gpus == 0.5
    with pytest.raises(OnnxclpError):
        run_tasks(scale_tasks.square, [1], workers=0)


def test_session_cache_builds_one_session_per_model():
    pytest.importorskip("onnxruntime")
    cache = SessionCache(max_size=1, device="cpu")
    a = next(p for p in GOLDEN if p.endswith("resnet.torchscript.onnx"))
    b = next(p for p in GOLDEN if p.endswith("vgg.torchscript.onnx"))
    first = cache.get(a)
    assert cache.get(a) is first and cache.built == 1
    cache.get(b)  # evicts a (max_size 1)
    assert cache.get(a) is not first and cache.built == 3 and len(cache) == 1
    assert cache.session(a).get_providers() == ["CPUExecutionProvider"]
