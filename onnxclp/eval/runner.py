"""Running an ONNX classifier with onnxruntime over prepared batches.

- :func:`select_providers` decides the execution providers from ``--device`` and what onnxruntime offers
  (pure, so it is tested without a GPU); :class:`OnnxClassifier` reports the provider it actually got.
- :class:`InputSpec` reads the input's name, layout (NCHW/NHWC), element type and fixed dimensions from the
  model. A dynamic batch dimension takes whole batches; a fixed one gets batches cut and zero-padded to it.
- :func:`prepared_batches` turns data-set indices into model-ready arrays (resize, trigger in [0, 1], then
  normalise, as in training: docs/algorithms.md, "Attacks") on a background thread, so preparing batch i+1 overlaps
  inference on batch i.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onnxclp.errors import OnnxclpError
from onnxclp.eval.attacks import Attack
from onnxclp.eval.data import ImageSet
from onnxclp.eval.metrics import attacked_mask
from onnxclp.eval.options import resolve_device

__all__ = [
    "CPU",
    "CUDA",
    "InputSpec",
    "OnnxClassifier",
    "PreparedBatch",
    "Preprocess",
    "describe_input",
    "prepared_batches",
    "select_providers",
]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                  "tensor(uint8)": np.uint8}  # fmt: skip  # uint8: pixels 0..255 (onnxclp.eval.normalize)


def as_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
    """``x`` in the model input's element type; to an integer type (an 8-bit image input) rounded and clipped to
    its range, so that pixels ``255 * k / 255`` computed in floating point stay ``k``."""
    if x.dtype == dtype:
        return x
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(x), info.min, info.max).astype(dtype)
    return x.astype(dtype)


def select_providers(requested: str, available: Sequence[str]) -> list[str]:
    """Execution providers for ``--device`` given onnxruntime's ``available`` providers.

    ``auto``: CUDA (with CPU as fallback for unsupported nodes) when available, else CPU. ``cuda``: CUDA or a
    one-line error naming the extra to install. ``cpu``: CPU only. ``requested`` follows the one device rule
    (:func:`~onnxclp.eval.options.resolve_device`: case-insensitive, an unknown value is an error).
    """
    requested = resolve_device(requested)
    if requested == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if requested == "cuda":
        raise OnnxclpError(
            "--device cuda: this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available) or 'none'}); install the 'eval-gpu' extra (onnxruntime-gpu) "
            "instead of 'eval': pip uninstall -y onnxruntime && pip install 'onnxclp[eval-gpu]'"
        )
    return [CPU]


@dataclass(frozen=True)
class InputSpec:
    """The model's image input: name, layout, element type and its fixed dimensions (None when dynamic)."""

    name: str
    layout: str
    dtype: type[np.floating[Any]]
    batch: int | None
    channels: int | None
    height: int | None
    width: int | None

    @classmethod
    def from_shape(cls, name: str, shape: Sequence[Any], elem_type: str, layout: str | None = None) -> InputSpec:
        """Read an input from onnxruntime's description (``shape`` entries are ints, names or None)."""
        if elem_type not in _ELEMENT_TYPES:
            raise OnnxclpError(
                f"model input {name!r} has type {elem_type}; evaluate needs a float or 8-bit (uint8) image input"
            )
        if len(shape) != 4:
            raise OnnxclpError(f"model input {name!r} has rank {len(shape)} (shape {list(shape)}); expected 4-D")
        dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
        if layout is None:
            if dims[1] in (1, 3, 4):
                layout = "nchw"
            elif dims[3] in (1, 3, 4):
                layout = "nhwc"
            else:
                layout = "nchw"
        layout = layout.lower()
        if layout not in ("nchw", "nhwc"):
            raise OnnxclpError(f"--layout must be nchw or nhwc, got {layout!r}")
        c, h, w = (dims[1], dims[2], dims[3]) if layout == "nchw" else (dims[3], dims[1], dims[2])
        return cls(name, layout, _ELEMENT_TYPES[elem_type], dims[0], c, h, w)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; dynamic dimensions are null."""
        return {
            "name": self.name,
            "layout": self.layout,
            "dtype": np.dtype(self.dtype).name,
            "batch": self.batch,
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
        }

    def compatible(self, other: InputSpec) -> bool:
        """Whether one prepared batch fits both inputs (batch size and element type may differ)."""
        return (self.layout, self.channels, self.height, self.width) == (
            other.layout,
            other.channels,
            other.height,
            other.width,
        )

    def describe(self) -> str:
        return describe_input(self.to_dict())


def describe_input(spec: dict[str, Any]) -> str:
    """``nchw 3×32×32, batch ?`` from :meth:`InputSpec.to_dict` (``?``: dynamic)."""

    def d(v: int | None) -> str:
        return "?" if v is None else str(v)

    chw = f"{d(spec['channels'])}×{d(spec['height'])}×{d(spec['width'])}"
    return f"{spec['layout']} {chw}, batch {d(spec['batch'])}"


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)) or (RuntimeError,)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class OnnxClassifier:
    """An onnxruntime session over a classifier with one image input; ``predict`` returns class indices."""

    def __init__(
        self,
        path: str | Path | bytes | Any,
        device: str = "auto",
        layout: str | None = None,
        threads: int | None = None,
    ) -> None:
        """``path``: a model file, or a model in memory (serialized bytes or a ModelProto whose tensors are all
        held in the proto: external data is not followed from memory), named ``<in-memory model>`` in messages."""
        import onnxruntime as ort

        device = resolve_device(device)
        source: str | bytes
        if isinstance(path, str | Path):
            self.path = Path(path)
            if not self.path.is_file():
                raise OnnxclpError(f"no such model file: {self.path}")
            # The safe loader's checks first (external data inside the model's folder, no links or devices,
            # sizes that fit the files, sane tensor headers): onnxruntime would otherwise follow whatever
            # external-data paths a hostile file names. Raises OnnxclpError (exit 2).
            from onnxclp.io import load_model

            load_model(self.path)
            source = str(self.path)
        else:
            self.path = Path("<in-memory model>")
            source = bytes(path) if isinstance(path, bytes | bytearray) else path.SerializeToString()
        providers = select_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # No busy-waiting of onnxruntime's intra-op threads between runs: the next batch is prepared on another
        # thread meanwhile, and spinning threads took the cores it needs (and other jobs' on a shared machine):
        # measured in bench/evaluate_speed.py, docs/evaluate.md, "Speed".
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(source, sess_options=options, providers=providers)
        except _ort_errors() as exc:
            raise OnnxclpError(f"onnxruntime cannot load {self.path}: {_first_line(exc)}") from exc
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != CUDA:
            raise OnnxclpError(
                "--device cuda: onnxruntime could not start CUDAExecutionProvider (CUDA/cuDNN libraries missing?)"
            )
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise OnnxclpError(f"{self.path}: evaluate needs a model with one image input, it has: {names}")
        self.input = InputSpec.from_shape(inputs[0].name, inputs[0].shape, inputs[0].type, layout)
        self.output_name = self.session.get_outputs()[0].name
        out_shape = self.session.get_outputs()[0].shape
        self.num_classes: int | None = None
        if len(out_shape) >= 2 and isinstance(out_shape[1], int) and all(d == 1 for d in out_shape[2:]):
            self.num_classes = out_shape[1]

    def probe_classes(self, channels: int, height: int, width: int) -> int:
        """Number of classes, running one zero batch when the output shape does not say."""
        if self.num_classes is None:
            x = np.zeros(self.model_shape(1, channels, height, width), self.input.dtype)
            self.num_classes = int(self._run(x).shape[1])
        return self.num_classes

    def model_shape(self, n: int, c: int, h: int, w: int) -> tuple[int, int, int, int]:
        return (n, c, h, w) if self.input.layout == "nchw" else (n, h, w, c)

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.session.run([self.output_name], {self.input.name: x})
        except _ort_errors() as exc:
            raise OnnxclpError(
                f"onnxruntime failed on {self.path.name} with input {list(x.shape)}: {_first_line(exc)}"
            ) from exc
        out = np.asarray(out)
        if out.ndim > 2 and all(d == 1 for d in out.shape[2:]):
            out = out.reshape(out.shape[0], out.shape[1])
        if out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise OnnxclpError(
                f"{self.path.name}: first output has shape {list(out.shape)} for a batch of {x.shape[0]}; "
                "expected (batch, classes) scores"
            )
        return out

    def _chunks(self, x: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """``x`` as the model takes it: whole (dynamic batch) or cut into and zero-padded to the fixed batch
        size; with each chunk, how many of its rows are real."""
        fixed = self.input.batch
        if fixed is None or x.shape[0] == fixed:
            yield x, x.shape[0]
            return
        for start in range(0, x.shape[0], fixed):
            chunk = x[start : start + fixed]
            n = chunk.shape[0]
            if n < fixed:
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            yield chunk, n

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Scores for a batch in the model's layout; cut into and padded to the model's fixed batch size."""
        outs = [out[:n] if n < len(out) else out for out, n in ((self._run(c), n) for c, n in self._chunks(x))]
        if len(outs) == 1:
            return outs[0]
        return np.concatenate(outs) if outs else np.zeros((0, self.num_classes or 0), np.float32)

    def outputs(self, x: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """The tensors ``names`` (graph outputs of the model) for a batch, batched as :meth:`logits` is."""
        x = as_dtype(x, self.input.dtype)
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for chunk, n in self._chunks(x):
            try:
                got = self.session.run(list(names), {self.input.name: chunk})
            except _ort_errors() as exc:
                raise OnnxclpError(
                    f"onnxruntime failed on {self.path.name} with input {list(chunk.shape)}: {_first_line(exc)}"
                ) from exc
            for part, out in zip(parts, got, strict=True):
                part.append(np.asarray(out)[:n])
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted class index (argmax of the first output) for each image of ``x``."""
        if x.shape[0] == 0:
            return np.zeros(0, np.int64)
        return self.logits(as_dtype(x, self.input.dtype)).argmax(axis=1).astype(np.int64)


@dataclass
class Preprocess:
    """What happens to a [0, 1] NCHW batch around the trigger: resize before it, normalise and lay out after."""

    size: tuple[int, int] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    layout: str = "nchw"
    dtype: type[np.floating[Any]] = np.float32

    def __post_init__(self) -> None:
        self._mean = None if self.mean is None else torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = None if self.std is None else torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if self.size is None or tuple(x.shape[-2:]) == tuple(self.size):
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)

    def to_model(self, x: torch.Tensor) -> np.ndarray:
        # one new tensor at most (sub), the division in place: the preparation thread shares the cores with
        # onnxruntime, so every pass over the batch counts (docs/evaluate.md, "Speed")
        if self._mean is not None:
            x = x.sub(self._mean)
            if self._std is not None:
                x.div_(self._std)
        elif self._std is not None:
            x = x.div(self._std)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return as_dtype(x.contiguous().numpy(), self.dtype)


@dataclass
class PreparedBatch:
    """One batch: labels, model-ready clean images, and the triggered images of its attacked subset."""

    y: np.ndarray
    clean: np.ndarray
    y_attacked: np.ndarray
    triggered: np.ndarray | None
    attacked: np.ndarray | None = None  # boolean mask of the attacked samples of the batch
    raw_clean: torch.Tensor | None = None
    raw_triggered: torch.Tensor | None = None


def _prepare(
    data: ImageSet,
    idx: np.ndarray,
    attack: Attack | None,
    target: int,
    mode: str,
    pre: Preprocess,
    keep_raw: bool,
) -> PreparedBatch:
    y = data.labels[idx]
    x = pre.resize(data.images(idx))
    mask = attacked_mask(y, target, mode)
    y_att = y[mask]
    triggered = raw_trig = None
    if attack is not None:
        raw_trig = attack.apply(x[torch.from_numpy(mask)])
        triggered = pre.to_model(raw_trig)
    return PreparedBatch(
        y=y,
        clean=pre.to_model(x),
        y_attacked=y_att,
        triggered=triggered,
        attacked=mask,
        raw_clean=x[torch.from_numpy(mask)] if keep_raw else None,
        raw_triggered=raw_trig if keep_raw else None,
    )


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prepared_batches(
    data: ImageSet,
    indices: np.ndarray,
    batch_size: int,
    attack: Attack | None,
    target: int,
    mode: str,
    pre: Preprocess,
    prefetch: int = 2,
    keep_raw_first: bool = False,
) -> Iterator[PreparedBatch]:
    """Prepared batches over ``indices`` in order; with ``prefetch`` > 0 they are built on a worker thread.

    ``attack`` None: no triggered images (the caller reuses the clean predictions). ``keep_raw_first`` keeps the
    [0, 1] tensors of the first batch that has attacked samples (for the example grid; a test set sorted by
    class may start with a whole batch of the target class).
    """
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    want_raw = [keep_raw_first]

    def build(i: int, idx: np.ndarray) -> PreparedBatch:
        batch = _prepare(data, idx, attack, target, mode, pre, want_raw[0])
        if want_raw[0] and len(batch.y_attacked):
            want_raw[0] = False
        elif want_raw[0]:
            batch.raw_clean = batch.raw_triggered = None
        return batch

    if prefetch <= 0:
        for i, idx in enumerate(chunks):
            yield build(i, idx)
        return

    q: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for i, idx in enumerate(chunks):
                if not put(build(i, idx)):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, re-raised there
            put(_Failure(exc))

    thread = threading.Thread(target=worker, name="onnxclp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                break
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
