"""The tensors of an untrusted ONNX model: checked on sight, read on demand, written in place.

Every external-data entry is checked (path inside the model's folder, no symlink or hard link, a regular file,
offset + length inside the file, length equal to the bytes its dims and type need) and its bytes are only read
when a pass asks for that tensor (:class:`TensorStore`), from the very file that was checked (device and inode
compared on open). Tensors held in the model are checked too: a known type, dims that are not negative or
absurd, and exactly the data the dims need. :func:`iter_graphs` and :func:`iter_tensors` walk a model's
subgraphs and weight-holding tensors. Loading and saving files is :mod:`onnxclp.io`. See docs/security.md.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from onnxclp.errors import OnnxclpError

# No tensor can have more elements than an int64 counts (numpy and onnxruntime index with int64).
MAX_ELEMENTS = 2**63 - 1


@dataclass(frozen=True)
class ExternalRef:
    """A checked external-data entry: where a tensor's bytes are, and which file was checked.

    ``dev`` and ``ino`` identify the file that passed the checks; reads compare them with the file they
    open, so a file swapped for a link between the check and the read is refused.
    """

    path: str
    offset: int
    length: int
    dev: int = -1
    ino: int = -1


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
    if n > MAX_ELEMENTS:
        raise OnnxclpError(f"tensor {name!r} declares {n} elements (dims {list(dims)}), more than any file can hold")
    return n


# Element types stored packed: bits per element (ONNX IR: INT4/UINT4/FLOAT4E2M1 two per byte, and so on).
_PACKED_BITS = {
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT4E2M1: 4,
    TensorProto.INT2: 2,
    TensorProto.UINT2: 2,
    TensorProto.FLOAT6E2M3: 6,
    TensorProto.FLOAT6E3M2: 6,
}


def _nbytes(data_type: int, numel: int) -> int:
    """Bytes that ``numel`` elements of ``data_type`` take in raw_data or an external file."""
    bits = _PACKED_BITS.get(data_type)
    if bits is not None:
        return (numel * bits + 7) // 8
    return numel * _dtype_of(data_type).itemsize


def _typed_count(data_type: int, numel: int) -> int:
    """Entries a tensor of ``numel`` elements has in its typed field (float_data, int32_data, ...)."""
    if data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return 2 * numel
    bits = _PACKED_BITS.get(data_type)
    if bits in (4, 2):  # int32_data holds the packed bytes, one byte per entry
        return (numel * bits + 7) // 8
    return numel


def _check_inline(tensor: TensorProto) -> None:
    """A tensor held in the model: known type, sane dims, and exactly as much data as its dims say."""
    name = tensor.name or "<unnamed>"
    if tensor.data_type == TensorProto.UNDEFINED:
        raise OnnxclpError(f"tensor {name!r} has no data type")
    _dtype_of(tensor.data_type)
    numel = _numel(tensor.dims, name)
    if tensor.HasField("raw_data"):
        if tensor.data_type == TensorProto.STRING:
            raise OnnxclpError(f"tensor {name!r}: string tensors cannot use raw_data")
        have, want = len(tensor.raw_data), _nbytes(tensor.data_type, numel)
        unit = "bytes"
    else:
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        have, want = len(getattr(tensor, field)), _typed_count(tensor.data_type, numel)
        unit = f"entries in {field}"
    if have != want:
        raise OnnxclpError(f"tensor {name!r}: {have} {unit} of data for dims {list(tensor.dims)} ({want} expected)")


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


# Floating-point layouts: (unsigned view, exponent mask, mantissa mask, quiet bit).
_NAN_BITS = {
    2: (np.uint16, 0x7C00, 0x03FF, 0x0200),  # float16
    4: (np.uint32, 0x7F800000, 0x007FFFFF, 0x00400000),
    8: (np.uint64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 0x0008000000000000),
}
_BF16_BITS = (np.uint16, 0x7F80, 0x007F, 0x0040)


def _quiet_nans(arr: np.ndarray) -> np.ndarray:
    """The array with signaling NaNs made quiet (same sign and payload otherwise).

    numpy raises an 'invalid value' warning each time a signaling NaN is cast or compared, which a hostile
    weight would turn into noise on stderr at every later step; a quiet NaN is refused or passed on like any
    other NaN. Bit operations only (they never warn), a megabyte at a time (a large weight gets no
    full-size temporaries), and nothing but a NaN check when there is no NaN.
    """
    bf16 = arr.dtype.name == "bfloat16"
    bits = _BF16_BITS if bf16 else _NAN_BITS.get(arr.dtype.itemsize) if arr.dtype.kind == "f" else None
    if bits is None or arr.size == 0:
        return arr
    utype, exp, mant, quiet = (bits[0], *(bits[0](b) for b in bits[1:]))
    step = 2**20 // arr.dtype.itemsize

    def snan(u: np.ndarray) -> np.ndarray:
        return ((u & exp) == exp) & ((u & mant) != 0) & ((u & quiet) == 0)

    flat = arr.reshape(-1)
    chunks = [slice(lo, lo + step) for lo in range(0, flat.size, step)]
    # isnan never warns, except on bfloat16 (ml_dtypes widens it): there, look at the bits directly.
    if not any(snan(flat[c].view(utype)).any() if bf16 else np.isnan(flat[c]).any() for c in chunks):
        return arr
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr).copy()
        flat = arr.reshape(-1)
    for c in chunks:
        u = flat[c].view(utype)
        u[snan(u)] |= quiet
    return arr


def _repeated(field) -> bool:
    rep = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have label
    return bool(rep) if rep is not None else field.label == field.LABEL_REPEATED


def check_text(message, where: str = "model") -> None:
    """Every string field of the message, recursively, is valid UTF-8 (the ONNX spec requires it).

    protobuf's parser does not check this for ONNX's proto2 messages: it hands such a field to Python as
    ``bytes`` instead of ``str``, which any name handling would then trip over.
    """
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for v in value if _repeated(field) else (value,):
                if not isinstance(v, str):
                    raise OnnxclpError(f"{where}.{field.name} is not valid UTF-8 text ({bytes(v)[:40]!r})")
        elif field.type == field.TYPE_MESSAGE:
            if _repeated(field):
                if field.message_type.GetOptions().map_entry:
                    continue
                for i, item in enumerate(value):
                    check_text(item, f"{where}.{field.name}[{i}]")
            else:
                check_text(value, f"{where}.{field.name}")


# The keys an external-data entry may have: ONNX's spec (onnx.proto, TensorProto.external_data) names location,
# offset, length and checksum; onnx's own Python reader also accepts basepath. onnxclp reads location, offset
# and length, and writes only those.
EXTERNAL_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def _check_external(tensor: TensorProto, base_dir: Path) -> ExternalRef:
    name = tensor.name or "<unnamed>"
    keys = [e.key for e in tensor.external_data]
    unknown = [k for k in keys if k not in EXTERNAL_KEYS]
    if unknown:
        raise OnnxclpError(
            f"tensor {name!r}: unknown external data key {unknown[0][:40]!r} "
            f"(ONNX knows {', '.join(sorted(EXTERNAL_KEYS))})"
        )
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        # Readers disagree on which of two entries wins: the file checked here could differ from the one read.
        raise OnnxclpError(f"tensor {name!r}: external data key {dup!r} appears more than once")
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location")
    if not location:
        raise OnnxclpError(f"tensor {name!r}: external data without a location")
    if "\0" in location:
        raise OnnxclpError(f"tensor {name!r}: external data location {location!r} contains a NUL character")
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
    except (OSError, ValueError) as exc:
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} not found") from exc
    if stat.S_ISLNK(st.st_mode) or os.path.realpath(path) != str(path):
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} is not a regular file")
    if st.st_nlink > 1:
        raise OnnxclpError(f"tensor {name!r}: external data file {location!r} is a hard link")
    if tensor.data_type == TensorProto.STRING:
        raise OnnxclpError(f"tensor {name!r}: string tensors cannot be stored as external data")
    try:
        offset = int(info.get("offset", "0"))
        expected = _nbytes(tensor.data_type, _numel(tensor.dims, name))
        length = int(info["length"]) if "length" in info else st.st_size - offset
    except ValueError as exc:
        raise OnnxclpError(f"tensor {name!r}: malformed external data offset or length") from exc
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise OnnxclpError(
            f"tensor {name!r}: external data [{offset}, {offset + length}) lies outside {location!r} "
            f"({st.st_size} bytes)"
        )
    if length != expected:
        raise OnnxclpError(
            f"tensor {name!r}: external data length {length} does not match its dims "
            f"{list(tensor.dims)} ({expected} bytes)"
        )
    return ExternalRef(str(path), offset, length, st.st_dev, st.st_ino)


def _open_checked(ref: ExternalRef):
    """Open the file of a checked entry for reading, refusing any other file now found at its path."""
    try:
        fd = os.open(ref.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise OnnxclpError(f"external data file {ref.path} cannot be opened ({exc.strerror or exc})") from exc
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (ref.dev, ref.ino) or not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise OnnxclpError(f"external data file {ref.path} was replaced after it was checked")
    if st.st_size < ref.offset + ref.length:
        os.close(fd)
        raise OnnxclpError(f"external data file {ref.path} was truncated after it was checked")
    return os.fdopen(fd, "rb")


def _external_key(tensor: TensorProto) -> tuple:
    # Protobuf message wrappers have no stable identity; the entry's own fields (and the tensor's type and
    # dims, which the checks depend on) identify it.
    return (tensor.data_type, tuple(tensor.dims), tuple((e.key, e.value) for e in tensor.external_data))


class TensorStore:
    """Reads the values of a model's tensors, in memory or external, after the checks above.

    Every tensor of the model is checked on construction: external entries by :func:`_check_external`,
    tensors held in the model for a known type and exactly the data their dims need. External tensors stay
    on disk until read; :meth:`read` returns a fresh numpy array. ``source`` is the model file, when the
    model came from one.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: Path, source: Path | None = None) -> None:
        self.base_dir = base_dir
        self.source = source
        check_text(model)
        self._external: dict[tuple, ExternalRef] = {}
        self.edited_external: set[str] = set()
        self.edited: set[str] = set()  # names of the tensors :meth:`write` changed (the report lists some)
        # Serialized size of the model as loaded (None when unknown); tensors copied on write add to it.
        self.size_hint: int | None = None
        for t in iter_tensors(model):
            if t.data_location == TensorProto.EXTERNAL:
                key = _external_key(t)
                if key not in self._external:
                    self._external[key] = _check_external(t, base_dir)
            else:
                _check_inline(t)

    def write(self, tensor: TensorProto, value: np.ndarray) -> None:
        """:func:`write_array`, remembering (by name) the tensor, and one that was external, so it is saved external."""
        if tensor.data_location == TensorProto.EXTERNAL and tensor.name:
            self.edited_external.add(tensor.name)
        if tensor.name:
            self.edited.add(tensor.name)
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

    @property
    def external_files(self) -> set[str]:
        """The (resolved, link-free) paths of every file the model's external data lives in."""
        return {ref.path for ref in self._external.values()}

    def read(self, tensor: TensorProto, writable: bool = True) -> np.ndarray:
        """The tensor's value as a numpy array, never a view of the model: editing it changes nothing.

        ``writable=False`` may return a read-only array (one copy less, for scoring). Signaling NaNs come
        back quiet (:func:`_quiet_nans`).
        """
        name = tensor.name or "<unnamed>"
        ref = self.external_ref(tensor)
        if ref is None and tensor.data_location == TensorProto.EXTERNAL:
            raise OnnxclpError(f"tensor {name!r}: external data that was not checked at load")
        dtype = _dtype_of(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        count = _numel(shape, name)
        if ref is not None:
            if tensor.data_type in _PACKED_BITS:
                with _open_checked(ref) as fh:
                    fh.seek(ref.offset)
                    packed = TensorProto(data_type=tensor.data_type, dims=shape, raw_data=fh.read(ref.length))
                return np.array(onnx.numpy_helper.to_array(packed), copy=True)
            # Read straight into the array: one copy of the tensor in memory, not two.
            arr = np.empty(shape, dtype=dtype.newbyteorder("<"))
            with _open_checked(ref) as fh:
                fh.seek(ref.offset)
                got = fh.readinto(memoryview(arr.reshape(-1).view(np.uint8)))
            if got != ref.length:
                raise OnnxclpError(f"tensor {name!r}: external data file changed while reading")
            return _quiet_nans(arr if arr.dtype == dtype else arr.astype(dtype))
        if tensor.HasField("raw_data"):
            raw = tensor.raw_data
            if len(raw) != _nbytes(tensor.data_type, count):
                raise OnnxclpError(
                    f"tensor {name!r}: {len(raw)} bytes of data for dims {list(shape)} "
                    f"({_nbytes(tensor.data_type, count)} expected)"
                )
            if dtype.kind in "fiub" and dtype.isbuiltin:  # plain numpy types: read the bytes directly
                arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(shape)
                return _quiet_nans(arr.astype(dtype) if writable or not dtype.isnative else arr)
        try:
            arr = onnx.numpy_helper.to_array(tensor)
        except Exception as exc:  # onnx raises bare ValueError/TypeError on inconsistent protos
            raise OnnxclpError(f"tensor {name!r}: cannot be read ({exc})") from exc
        if arr.size != count:
            raise OnnxclpError(f"tensor {name!r}: {arr.size} values for dims {list(shape)}")
        return _quiet_nans(np.array(arr, copy=True))


def cast_checked(value: np.ndarray, dtype: np.dtype, what: str, noun: str = "edited values") -> np.ndarray:
    """``value`` cast to ``dtype``; a finite value that does not fit it (overflow to Inf) is refused.

    A hostile BatchNormalization can make a folded weight exceed float32 (or float16), and a hostile Cast in a
    weight chain can do the same: writing or scoring Inf would break the model, and numpy would print an
    overflow warning on the way. ``noun`` names the values in the message.
    """
    value = np.asarray(value)
    if value.dtype == dtype:
        return value
    with np.errstate(over="ignore", invalid="ignore"):
        out = value.astype(dtype)
    floats = [d.kind == "f" or d.name == "bfloat16" for d in (value.dtype, np.dtype(dtype))]
    if all(floats) and not np.all(np.isfinite(out) | ~np.isfinite(value)):
        verb = "do" if noun.endswith("s") else "does"
        raise OnnxclpError(f"{what}: the {noun} {verb} not fit {np.dtype(dtype).name} (overflow)")
    return out


def write_array(tensor: TensorProto, value: np.ndarray) -> None:
    """Replace a tensor's value in place, keeping its name, dtype, dims and doc string.

    The value is cast to the tensor's own dtype (a float16 weight stays float16; an overflow is refused,
    :func:`cast_checked`) and stored as raw_data; any external-data entry is dropped (the saver decides where
    the tensor goes).
    """
    dtype = _dtype_of(tensor.data_type)
    value = cast_checked(value, dtype, f"tensor {tensor.name or '<unnamed>'!r}")
    arr = np.ascontiguousarray(value.reshape(tuple(tensor.dims)))
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = arr.astype(dtype.newbyteorder("<"), copy=False).tobytes()
