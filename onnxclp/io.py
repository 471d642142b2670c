"""Loading untrusted ONNX files safely, and writing outputs atomically.

The model file is parsed with ``load_external_data=False``; external data is never resolved by onnx.
Every external-data entry is checked here (path inside the model's folder, no symlink or hard link, offset +
length inside the file, length equal to dims x item size) and its bytes are only read when a pass asks for
that tensor (:class:`TensorStore`). On save, tensors that nobody edited are streamed from the input's files
to the output's data file in chunks, so a model over 2 GiB is never held in memory at once.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnxclp.errors import OnnxclpError

# Tensors at least this large are written as external data when the output uses external data.
EXTERNAL_THRESHOLD = 1024
# The protobuf hard limit for one serialized message.
PROTO_LIMIT = 2**31 - 1
_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class ExternalRef:
    """A checked external-data entry: where a tensor's bytes are."""

    path: str
    offset: int
    length: int


def _dtype_of(data_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise OnnxclpError(f"unsupported tensor data type {data_type}") from exc


def _numel(dims: list[int] | tuple[int, ...], name: str) -> int:
    n = 1
    for d in dims:
        if d < 0:
            raise OnnxclpError(f"tensor {name!r} has a negative dimension {d}")
        n *= int(d)
    return n


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and, recursively, every subgraph held in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model that can hold weights: initializers, Constant values, attributes."""
    graphs = list(iter_graphs(model.graph))
    for f in model.functions:
        for node in f.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(iter_graphs(attr.g))
    for g in graphs:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
    for nodes in [g.node for g in graphs] + [f.node for f in model.functions]:
        for node in nodes:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def _check_external(tensor: TensorProto, base_dir: Path) -> ExternalRef:
    info = {e.key: e.value for e in tensor.external_data}
    name = tensor.name or "<unnamed>"
    location = info.get("location")
    if not location:
        raise OnnxclpError(f"tensor {name!r}: external data without a location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ":" in location:
        raise OnnxclpError(f"tensor {name!r}: external data location {location!r} is an absolute path")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise OnnxclpError(f"tensor {name!r}: external data location {location!r} leaves the model's folder")
    base = base_dir.resolve()
    path = base / Path(*parts)
    # No component of the path may be a symlink: compare the resolved path with the literal one.
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} not found") from exc
    if stat.S_ISLNK(st.st_mode) or os.path.realpath(path) != str(path):
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} is not a regular file")
    if st.st_nlink > 1:
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} is a hard link")
    try:
        offset = int(info.get("offset", "0"))
        itemsize = _dtype_of(tensor.data_type).itemsize
        expected = _numel(tensor.dims, name) * itemsize
        length = int(info["length"]) if "length" in info else st.st_size - offset
    except ValueError as exc:
        raise OnnxclpError(f"tensor {name!r}: malformed external data offset or length") from exc
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise OnnxclpError(
            f"tensor {name!r}: external data [{offset}, {offset + length}) lies outside {location!r} "
            f"({st.st_size} bytes)"
        )
    if tensor.data_type == TensorProto.STRING:
        raise OnnxclpError(f"tensor {name!r}: string tensors cannot be stored as external data")
    if length != expected:
        raise OnnxclpError(
            f"tensor {name!r}: external data length {length} does not match its dims "
            f"{list(tensor.dims)} ({expected} bytes)"
        )
    return ExternalRef(str(path), offset, length)


def _external_key(tensor: TensorProto) -> tuple:
    # Protobuf message wrappers have no stable identity; the entry's own fields (and the tensor's type and
    # dims, which the checks depend on) identify it.
    return (tensor.data_type, tuple(tensor.dims), tuple((e.key, e.value) for e in tensor.external_data))


class TensorStore:
    """Reads the values of a model's tensors, in memory or external, after the checks above.

    External tensors stay on disk until read; :meth:`read` returns a fresh numpy array.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._external: dict[tuple, ExternalRef] = {}
        self.edited_external: set[str] = set()
        # Serialized size of the model as loaded (None when unknown); tensors copied on write add to it.
        self.size_hint: int | None = None
        for t in iter_tensors(model):
            if t.data_location == TensorProto.EXTERNAL:
                key = _external_key(t)
                if key not in self._external:
                    self._external[key] = _check_external(t, base_dir)

    def write(self, tensor: TensorProto, value: np.ndarray) -> None:
        """:func:`write_array`, remembering (by name) a tensor that was external, so it is saved external."""
        if tensor.data_location == TensorProto.EXTERNAL and tensor.name:
            self.edited_external.add(tensor.name)
        write_array(tensor, value)

    def external_ref(self, tensor: TensorProto) -> ExternalRef | None:
        """The checked location of an external tensor, or None for a tensor held in the model."""
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        return self._external.get(_external_key(tensor))

    @property
    def has_external(self) -> bool:
        """Whether the input model stores any tensor as external data."""
        return bool(self._external)

    def read(self, tensor: TensorProto, writable: bool = True) -> np.ndarray:
        """The tensor's value as a numpy array, never a view of the model: editing it changes nothing.

        ``writable=False`` may return a read-only array (one copy less, for scoring).
        """
        name = tensor.name or "<unnamed>"
        ref = self.external_ref(tensor)
        if ref is None and tensor.data_location == TensorProto.EXTERNAL:
            raise OnnxclpError(f"tensor {name!r}: external data that was not checked at load")
        dtype = _dtype_of(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        count = _numel(shape, name)
        if ref is not None:
            with open(ref.path, "rb") as fh:
                fh.seek(ref.offset)
                raw = fh.read(ref.length)
            if len(raw) != ref.length:
                raise OnnxclpError(f"tensor {name!r}: external data file changed while reading")
            return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)
        if tensor.HasField("raw_data"):
            raw = tensor.raw_data
            if len(raw) != count * dtype.itemsize:
                raise OnnxclpError(
                    f"tensor {name!r}: {len(raw)} bytes of data for dims {list(shape)} "
                    f"({count * dtype.itemsize} expected)"
                )
            if dtype.kind in "fiub" and dtype.isbuiltin:  # plain numpy types: read the bytes directly
                arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
                return arr.astype(dtype) if writable or not dtype.isnative else arr
        try:
            arr = onnx.numpy_helper.to_array(tensor)
        except Exception as exc:  # onnx raises bare ValueError/TypeError on inconsistent protos
            raise OnnxclpError(f"tensor {name!r}: cannot be read ({exc})") from exc
        if arr.size != count:
            raise OnnxclpError(f"tensor {name!r}: {arr.size} values for dims {list(shape)}")
        return np.array(arr, copy=True)


def write_array(tensor: TensorProto, value: np.ndarray) -> None:
    """Replace a tensor's value in place, keeping its name, dtype, dims and doc string.

    The value is cast to the tensor's own dtype (a float16 weight stays float16) and stored as raw_data;
    any external-data entry is dropped (the saver decides where the tensor goes).
    """
    dtype = _dtype_of(tensor.data_type)
    arr = np.ascontiguousarray(np.asarray(value).astype(dtype).reshape(tuple(tensor.dims)))
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = arr.astype(dtype.newbyteorder("<"), copy=False).tobytes()


def load_model(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, TensorStore]:
    """Parse an untrusted ONNX file without following its external-data references.

    Returns the model (external tensors left as references) and the store that reads tensor values.
    Raises :class:`OnnxclpError` (exit 2) for a missing file, a file that is not ONNX, or an unsafe
    external-data entry.
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
    if not model.HasField("graph") or (model.ir_version == 0 and not model.opset_import):
        raise OnnxclpError(f"{p}: not an ONNX model (no graph or no ir_version)")
    store = TensorStore(model, p.parent)
    store.size_hint = size
    return model, store


def _proto_fits(model: onnx.ModelProto, size_hint: int | None = None) -> bool:
    if size_hint is not None and size_hint < PROTO_LIMIT // 2:
        return True  # far from the limit: no need to walk the whole message to size it
    try:
        return model.ByteSize() < PROTO_LIMIT - 2**20
    except Exception:  # pragma: no cover - protobuf refuses to size a > 2 GiB message on some builds
        return False


def _copy_range(src: ExternalRef, dst) -> None:
    with open(src.path, "rb") as fh:
        fh.seek(src.offset)
        left = src.length
        while left:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                raise OnnxclpError(f"external data file {src.path} changed while copying")
            dst.write(chunk)
            left -= len(chunk)


def _set_default_mode(path: str) -> None:
    """mkstemp creates files 0600; give outputs the mode a plain open() would (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_model(model: onnx.ModelProto, store: TensorStore, out: str | os.PathLike[str]) -> list[str]:
    """Write the model to ``out`` atomically; returns the paths written.

    The output uses external data (one file, ``<out name>.data``, beside ``out``) when the input did or
    when the model would not fit in one protobuf message; then every tensor of at least
    ``EXTERNAL_THRESHOLD`` bytes goes there, unedited external tensors copied in chunks. Files are first
    written under temporary names in the output folder and renamed into place once complete, so an
    interrupted run never leaves a partial ``out``.
    """
    out_path = Path(out)
    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxclpError(f"{out_path}: output folder {folder} does not exist")
    use_external = store.has_external or not _proto_fits(model, store.size_hint)
    data_name = out_path.name + ".data"
    written: list[str] = []
    tmp_files: list[str] = []
    try:
        data_tmp = None
        if use_external:
            fd, data_tmp = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
            tmp_files.append(data_tmp)
            _set_default_mode(data_tmp)
            with os.fdopen(fd, "wb") as dst:
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
        fd, model_tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder)
        tmp_files.append(model_tmp)
        _set_default_mode(model_tmp)
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
        if data_tmp is not None:
            os.replace(data_tmp, folder / data_name)
            written.append(str(folder / data_name))
        os.replace(model_tmp, out_path)
        written.insert(0, str(out_path))
    except OSError as exc:
        raise OnnxclpError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        for tmp in tmp_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return written
