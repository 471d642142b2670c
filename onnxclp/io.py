"""Loading untrusted ONNX files safely, and writing outputs atomically.

The model file is parsed with ``load_external_data=False``; external data is never resolved by onnx.
Every tensor, held in the model or external, is checked by :class:`~onnxclp.tensors.TensorStore` (re-exported
here with the other names of :mod:`onnxclp.tensors`) and the model by :func:`onnxclp.validate.check_model`.
On save, tensors that nobody edited are streamed from the input's files to the output's data file in chunks,
so a model over 2 GiB is never held in memory at once; each output file is written unnamed, flushed, and only
then named, so no partial output is ever seen.
See docs/security.md.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxclp.errors import OnnxclpError
from onnxclp.tensors import (  # re-exported: onnxclp.io was their home
    EXTERNAL_KEYS,
    MAX_ELEMENTS,
    ExternalRef,
    TensorStore,
    _open_checked,
    cast_checked,
    check_text,
    iter_graphs,
    iter_tensors,
    write_array,
)
from onnxclp.validate import check_model

# Tensors at least this large are written as external data when the output uses external data.
EXTERNAL_THRESHOLD = 1024
# The protobuf hard limit for one serialized message.
PROTO_LIMIT = 2**31 - 1
_CHUNK = 16 * 2**20

__all__ = [
    "EXTERNAL_KEYS",
    "EXTERNAL_THRESHOLD",
    "MAX_ELEMENTS",
    "PROTO_LIMIT",
    "ExternalRef",
    "TensorStore",
    "cast_checked",
    "check_text",
    "checked_store",
    "iter_graphs",
    "iter_tensors",
    "load_model",
    "save_model",
    "write_array",
]


def load_model(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, TensorStore]:
    """Parse an untrusted ONNX file without following its external-data references.

    Returns the model (external tensors left as references) and the store that reads tensor values.
    Raises :class:`OnnxclpError` (exit 2) for a missing file, a file that is not ONNX, an unsafe
    external-data entry, or a model that onnx's checker or onnxclp's channel checks refuse
    (:func:`onnxclp.validate.check_model`).
    """
    p = Path(path)
    if not p.exists():
        raise OnnxclpError(f"{p}: no such file")
    if not p.is_file():
        raise OnnxclpError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise OnnxclpError(f"{p}: empty file, not an ONNX model")
    if size > PROTO_LIMIT:
        raise OnnxclpError(f"{p}: {size} bytes, larger than the 2 GiB protobuf limit (use external data)")
    try:
        model = onnx.load(str(p), format="protobuf", load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxclpError(f"{p}: not a valid ONNX model (cannot be parsed: {type(exc).__name__})") from exc
    store = checked_store(model, p.parent, str(p), p)
    store.size_hint = size
    return model, store


def checked_store(
    model: onnx.ModelProto, base_dir: Path, where: str = "model", source: Path | None = None
) -> TensorStore:
    """The checks every model goes through, from a file (:func:`load_model`) or in memory
    (:func:`onnxclp.api.sanitize` given a ModelProto): a graph and an IR version, every tensor
    (:class:`TensorStore`, external data resolved against ``base_dir``), then
    :func:`onnxclp.validate.check_model`. ``where`` starts the error messages. Returns the store."""
    if not model.HasField("graph") or (model.ir_version == 0 and not model.opset_import):
        raise OnnxclpError(f"{where}: not an ONNX model (no graph or no ir_version)")
    store = TensorStore(model, base_dir, source)
    check_model(model, where)
    return store


def _proto_fits(model: onnx.ModelProto, size_hint: int | None = None) -> bool:
    if size_hint is not None and size_hint < PROTO_LIMIT // 2:
        return True  # far from the limit: no need to walk the whole message to size it
    try:
        return model.ByteSize() < PROTO_LIMIT - 2**20
    except Exception:  # pragma: no cover - protobuf refuses to size a > 2 GiB message on some builds
        return False


def _copy_range(src: ExternalRef, dst) -> None:
    with _open_checked(src) as fh:
        fh.seek(src.offset)
        left = src.length
        while left:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                raise OnnxclpError(f"external data file {src.path} changed while copying")
            dst.write(chunk)
            left -= len(chunk)


def _umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask races threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _PendingFile:
    """A file written in the output folder that gets its name only once complete (:meth:`commit`).

    On Linux it is created unnamed (``O_TMPFILE``): if the process dies, even by SIGKILL, nothing is left in
    the folder. Where the system or filesystem lacks that, it is a hidden temporary file, removed by
    :meth:`discard` on any error (a SIGKILL leaves it behind). Either way the mode is that of a plain
    ``open()``: 0666 less the umask.
    """

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.tmp_path: str | None = None
        fd = None
        if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666)
            except OSError:  # EOPNOTSUPP (filesystem), EISDIR (old kernel), ...
                fd = None
        if fd is None:
            fd, self.tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.chmod(self.tmp_path, 0o666 & ~_umask())
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> str:
        """Flush the file to disk and give it its name, replacing any file of that name; returns the path."""
        self.file.flush()
        os.fsync(self.file.fileno())
        if self.tmp_path is None:
            # linkat() cannot replace a name: link under a fresh hidden name, then rename over the target.
            tmp = f".{self.name}.{secrets.token_hex(8)}.tmp"
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.link(f"/proc/self/fd/{self.file.fileno()}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
            finally:
                os.close(dir_fd)
            self.tmp_path = str(self.folder / tmp)
        self.file.close()
        target = self.folder / self.name
        os.replace(self.tmp_path, target)
        self.tmp_path = None
        return str(target)

    def discard(self) -> None:
        """Drop the file (an unnamed one vanishes when closed)."""
        if not self.file.closed:
            self.file.close()
        if self.tmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)


def _check_targets(store: TensorStore, folder: Path, names: list[str], out_path: Path) -> None:
    """Refuse to replace a file the input model reads its external data from (it would change the input).

    Writing over the input model itself is the caller's business (``--force``), and then its data files
    may be replaced too: they are read in full before anything is renamed.
    """
    if store.source is not None and out_path.exists() and os.path.samefile(store.source, out_path):
        return
    inputs = store.external_files
    base = folder.resolve()
    for name in names:
        if str(base / name) in inputs:
            raise OnnxclpError(
                f"{out_path}: writing it would replace {base / name}, which the input model reads its weights "
                "from; choose another output name"
            )


def save_model(model: onnx.ModelProto, store: TensorStore, out: str | os.PathLike[str]) -> list[str]:
    """Write the model to ``out`` atomically; returns the paths written.

    The output uses external data (one file, ``<out name>.data``, beside ``out``) when the input did or
    when the model would not fit in one protobuf message; then every tensor of at least
    ``EXTERNAL_THRESHOLD`` bytes goes there, unedited external tensors copied in chunks. Each file is
    written unnamed (or under a hidden temporary name), flushed to disk and only then renamed into place,
    the data file before the model, so an interrupted run never leaves a partial ``out``. Refuses an ``out``
    or ``out.data`` that is one of the input's external data files.
    """
    out_path = Path(out)
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxclpError(f"{out_path}: output folder {folder} does not exist")
    use_external = store.has_external or not _proto_fits(model, store.size_hint)
    data_name = out_path.name + ".data"
    _check_targets(store, folder, [out_path.name, data_name] if use_external else [out_path.name], out_path)
    written: list[str] = []
    pending: list[_PendingFile] = []
    try:
        data_file = None
        if use_external:
            data_file = _PendingFile(folder, data_name)
            pending.append(data_file)
            dst = data_file.file
            offset = 0
            for t in iter_tensors(model):
                ref = store.external_ref(t)
                if ref is None and t.data_location == TensorProto.EXTERNAL:
                    raise OnnxclpError(f"tensor {t.name!r}: external data that was not checked")
                if ref is None and (
                    not t.HasField("raw_data")
                    or (len(t.raw_data) < EXTERNAL_THRESHOLD and t.name not in store.edited_external)
                ):
                    continue
                pad = (-offset) % 4096  # page-aligned, as onnx's own saver does for mmap
                dst.write(b"\0" * pad)
                offset += pad
                if ref is not None:
                    _copy_range(ref, dst)
                    length = ref.length
                else:
                    raw = t.raw_data
                    dst.write(raw)
                    length = len(raw)
                    t.ClearField("raw_data")
                del t.external_data[:]
                for key, value in (
                    ("location", data_name),
                    ("offset", str(offset)),
                    ("length", str(length)),
                ):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                t.data_location = TensorProto.EXTERNAL
                offset += length
        model_file = _PendingFile(folder, out_path.name)
        pending.append(model_file)
        model_file.file.write(model.SerializeToString())
        if data_file is not None:
            written.append(data_file.commit())
        written.insert(0, model_file.commit())
    except OSError as exc:
        raise OnnxclpError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        for f in pending:
            f.discard()
    return written
