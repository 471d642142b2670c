"""Determinism and atomicity (issue #7, part 5).

- Two runs give byte-identical models (and external data files) and reports (``to_json(timings=False)``), in
  one process and in two processes with different hash seeds.
- A sanitize that fails while writing (the write raises) or is killed with SIGKILL while writing leaves no
  OUT, no OUT.data and no temporary file, and an OUT that existed before is left as it was.
- Two sanitizes of the same input at once (threads, and processes) both succeed, to different outputs or to
  the same one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper
from test_hostile import externalize, init, raw_of, small_model, snapshot, write

import onnxclp.io
from onnxclp import OnnxclpError, sanitize, sanitize_file


def outlier_model() -> onnx.ModelProto:
    """The small model with an outlier channel in conv1, so that sanitize edits something."""
    m = small_model()
    w = numpy_helper.to_array(init(m, "W1")).copy()
    w[5] *= 40.0
    init(m, "W1").CopyFrom(numpy_helper.from_array(w, "W1"))
    return m


def external_model(folder: Path, name: str = "model.onnx") -> Path:
    """``outlier_model`` with W1 and W2 as external data in ``weights.bin``."""
    m = outlier_model()
    data = b""
    for t in ("W1", "W2"):
        raw = raw_of(m, t)
        externalize(init(m, t), "weights.bin", len(data), len(raw))
        data += raw
    (folder / "weights.bin").write_bytes(data)
    return write(folder / name, m)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["clp", "lpp"])
@pytest.mark.parametrize("fuse", [False, True])
def test_two_runs_in_memory_are_identical(method: str, fuse: bool) -> None:
    m = outlier_model()
    runs = [sanitize(m, method, 2.0, fuse_bn=fuse) for _ in range(2)]
    assert runs[0][1].pruned_channels > 0
    assert runs[0][0].SerializeToString() == runs[1][0].SerializeToString()
    assert runs[0][1].to_json(timings=False) == runs[1][1].to_json(timings=False)


def test_two_runs_to_files_are_identical(tmp_path: Path) -> None:
    src = external_model(tmp_path)
    out = tmp_path / "out.onnx"
    seen = []
    for _ in range(2):
        report = sanitize_file(src, out, "lpp", 2.0, fuse_bn=True)
        seen.append((digest(out), digest(tmp_path / "out.onnx.data"), report.to_json(timings=False)))
    assert seen[0] == seen[1]


def test_two_processes_with_different_hash_seeds_are_identical(tmp_path: Path) -> None:
    """The CLI in two processes (PYTHONHASHSEED 1 and 2: set and dict orders of strings differ)."""
    src = external_model(tmp_path)
    seen = []
    for seed in ("1", "2"):
        out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
        proc = subprocess.run(
            [sys.executable, "-m", "onnxclp.cli", "sanitize", str(src), str(out), "-u", "2", "--report", str(rep)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(rep.read_text())
        report.pop("time_s")
        seen.append((digest(out), digest(tmp_path / "out.onnx.data"), report))
    assert seen[0] == seen[1]


# ---------------------------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------------------------


def _leftovers(folder: Path, expected: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - expected


def test_write_that_fails_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while the weights are copied: no OUT, no OUT.data, no temporary file."""
    src = external_model(tmp_path)
    real = onnxclp.io._copy_range
    calls = []

    def fail_on_second(ref, dst):
        calls.append(ref)
        if len(calls) == 2:
            dst.write(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(ref, dst)

    monkeypatch.setattr(onnxclp.io, "_copy_range", fail_on_second)
    before = snapshot(tmp_path)
    with pytest.raises(OnnxclpError, match="No space left"):
        sanitize_file(src, tmp_path / "out.onnx")
    assert snapshot(tmp_path) == before


def test_failed_write_keeps_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OUT and OUT.data from an earlier run stay exactly as they were when a new write fails."""
    src = external_model(tmp_path)
    out = tmp_path / "out.onnx"
    sanitize_file(src, out)
    before = snapshot(tmp_path)

    def fail(ref, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(onnxclp.io, "_copy_range", fail)
    with pytest.raises(OnnxclpError, match="Input/output error"):
        sanitize_file(src, out, "lpp")
    assert snapshot(tmp_path) == before


def test_model_write_that_fails_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same when the failure comes while writing the model file itself (no external data)."""
    src = write(tmp_path / "m.onnx", outlier_model())

    class Boom(Exception):
        pass

    def boom(self):
        raise Boom("serializer failed")

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", boom)
    before = snapshot(tmp_path)
    with pytest.raises(Boom):
        sanitize_file(src, tmp_path / "out.onnx")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


# The child process: sanitize, but stop forever in the middle of copying the weights (after one tensor is
# written) and say so on stdout, so that the parent can SIGKILL it at that exact moment.
_SLOW_CHILD = """
import sys, time
import onnxclp.io as io
real = io._copy_range
def slow(ref, dst):
    real(ref, dst)
    dst.flush()
    print("writing", flush=True)
    time.sleep(600)
io._copy_range = slow
sys.argv = ["onnxclp", "sanitize", sys.argv[1], sys.argv[2]]
from onnxclp.cli import main
main()
"""


@pytest.mark.parametrize("existing", [False, True])
def test_sigkill_while_writing_leaves_no_partial_output(tmp_path: Path, existing: bool) -> None:
    src = external_model(tmp_path)
    out = tmp_path / "out.onnx"
    if existing:
        sanitize_file(src, out, "lpp")
    before = snapshot(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CHILD, str(src), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "writing", child.stderr.read()
        # The child holds its half-written data file open right now.
        fds = [os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")]
        assert any(str(tmp_path) in target for target in fds if "weights.bin" not in target), fds
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert snapshot(tmp_path) == before  # no OUT (or the old one intact), no OUT.data, no temporary file


# ---------------------------------------------------------------------------------------------------------------
# Concurrency
# ---------------------------------------------------------------------------------------------------------------


def _weights(path: Path) -> dict[str, bytes]:
    m = onnx.load(str(path))  # onnx's loader resolves the external data beside the file
    return {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}


def test_two_threads_sanitize_the_same_input_at_once(tmp_path: Path) -> None:
    src = external_model(tmp_path)
    errors: list[BaseException] = []

    def go(name: str) -> None:
        try:
            sanitize_file(src, tmp_path / name, "lpp", 2.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(f"out{i}.onnx",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _weights(tmp_path / "out0.onnx") == _weights(tmp_path / "out1.onnx")
    assert digest(tmp_path / "out0.onnx.data") == digest(tmp_path / "out1.onnx.data")
    assert _leftovers(tmp_path, {"model.onnx", "weights.bin"}) == {
        "out0.onnx",
        "out0.onnx.data",
        "out1.onnx",
        "out1.onnx.data",
    }


@pytest.mark.parametrize("same_output", [False, True])
def test_two_processes_sanitize_the_same_input_at_once(tmp_path: Path, same_output: bool) -> None:
    src = external_model(tmp_path)
    names = ["out.onnx", "out.onnx"] if same_output else ["out0.onnx", "out1.onnx"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "onnxclp.cli", "sanitize", str(src), str(tmp_path / n), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in names
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    single = tmp_path / "single"
    single.mkdir()
    sanitize_file(src, single / "out.onnx")
    for n in set(names):
        assert _weights(tmp_path / n) == _weights(single / "out.onnx")
    assert _leftovers(tmp_path, {"model.onnx", "weights.bin", "single"}) == {x for n in names for x in (n, n + ".data")}


def test_output_files_get_the_default_mode(tmp_path: Path) -> None:
    """Outputs are created like a plain open() would create them (0666 less the umask), not 0600."""
    src = external_model(tmp_path)
    sanitize_file(src, tmp_path / "out.onnx")
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("out.onnx", "out.onnx.data"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_sanitized_output_matches_in_memory_result(tmp_path: Path) -> None:
    """The file written (external data included) holds exactly the weights of the in-memory result."""
    src = external_model(tmp_path)
    model, _ = sanitize(outlier_model(), "lpp", 2.0)
    sanitize_file(src, tmp_path / "out.onnx", "lpp", 2.0)
    expected = {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
    assert _weights(tmp_path / "out.onnx") == expected
    original = {t.name: numpy_helper.to_array(t).tobytes() for t in outlier_model().graph.initializer}
    assert expected != original  # something was edited (conv1's outlier channel)
