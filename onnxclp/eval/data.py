"""Local image data sets for evaluation: ``.npz`` arrays, ImageFolder directories, CIFAR python batches.

Every loader returns an :class:`ImageSet`: integer labels plus ``images(indices)``, which gives a batch as a
float32 torch tensor (N, C, H, W) in [0, 1] — the space in which triggers are applied (docs/algorithms.md, "Attacks").
Arrays stay in their stored dtype (uint8 usually) until a batch is asked for; folder images are decoded on
demand, a batch at a time, so a large folder is never held in memory.

The CIFAR python batches are pickles. They are read with :class:`RestrictedUnpickler`, which resolves only the
handful of numpy functions needed to rebuild a plain ndarray and refuses every other global, so a hostile
file can neither import a module nor call anything.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onnxclp.errors import OnnxclpError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImages",
    "FolderImages",
    "ImageSet",
    "RestrictedUnpickler",
    "load_cifar_batch",
    "load_dataset",
    "load_folder",
    "load_npz",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
_CHANNEL_COUNTS = (1, 3, 4)


class ImageSet(ABC):
    """A labelled set of images of one size; ``images(idx)`` gives float32 (n, C, H, W) in [0, 1]."""

    labels: np.ndarray
    channels: int
    height: int
    width: int
    description: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abstractmethod
    def images(self, idx: np.ndarray) -> torch.Tensor:
        """Images at the (sorted) indices ``idx``."""


class ArrayImages(ImageSet):
    """Images held in one array, (N, H, W, C) (``layout="hwc"``) or (N, C, H, W), uint8 or float in [0, 1]."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, layout: str, description: str) -> None:
        if layout not in ("hwc", "chw"):
            raise ValueError(f"layout must be 'hwc' or 'chw', got {layout!r}")
        self.x = x
        self.labels = labels
        self.layout = layout
        self.description = description
        if layout == "hwc":
            _, self.height, self.width, self.channels = x.shape
        else:
            _, self.channels, self.height, self.width = x.shape

    def images(self, idx: np.ndarray) -> torch.Tensor:
        idx = np.asarray(idx)
        contiguous = idx.size and idx[-1] - idx[0] + 1 == idx.size  # sorted, unique: a slice avoids a gather
        chunk = self.x[int(idx[0]) : int(idx[-1]) + 1] if contiguous else self.x[idx]
        t = torch.from_numpy(np.ascontiguousarray(chunk))
        if self.layout == "hwc":
            t = t.permute(0, 3, 1, 2)
        # one pass into a contiguous float32 NCHW batch (then the scaling in place)
        out = torch.empty(t.shape, dtype=torch.float32)
        out.copy_(t)
        return out.div_(255.0) if t.dtype == torch.uint8 else out


class FolderImages(ImageSet):
    """An ImageFolder-style directory: one sub-folder per class (sorted names = class indices 0, 1, ...).

    Images are decoded with Pillow when a batch is requested, converted to ``channels`` (grey or RGB) and,
    when ``size`` is given, resized to it (bilinear). Without ``size`` every image must have the size of the
    first one.
    """

    def __init__(
        self,
        root: Path,
        files: list[Path],
        labels: np.ndarray,
        classes: list[str],
        channels: int,
        size: tuple[int, int] | None,
        workers: int | None = None,
    ) -> None:
        self.root = root
        self.files = files
        self.labels = labels
        self.classes = classes
        self.channels = channels
        self.resize = size is not None
        self.description = f"image folder {root} ({len(classes)} classes)"
        if size is None:
            size = self._peek_size(files[0])
        self.height, self.width = size
        self._workers = workers or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @staticmethod
    def _peek_size(path: Path) -> tuple[int, int]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                return img.height, img.width
        except (OSError, UnidentifiedImageError) as exc:
            raise OnnxclpError(f"cannot read image {path}: {exc}") from exc

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.channels == 1 else "RGB")
                if (img.height, img.width) != (self.height, self.width):
                    if not self.resize:
                        raise OnnxclpError(
                            f"image {path} is {img.height}×{img.width}, the first image is "
                            f"{self.height}×{self.width}; pass --input-size H,W to resize them all"
                        )
                    img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise OnnxclpError(f"cannot read image {path}: {exc}") from exc
        return arr[:, :, None] if arr.ndim == 2 else arr

    def images(self, idx: np.ndarray) -> torch.Tensor:
        paths = [self.files[int(i)] for i in idx]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="onnxclp-decode")
        arrays = list(self._pool.map(self._decode, paths))
        batch = np.stack(arrays) if arrays else np.zeros((0, self.height, self.width, self.channels), np.uint8)
        return torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()

    def __del__(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


# --------------------------------------------------------------------------------------------------------------
# checks shared by the array loaders


def _check_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise OnnxclpError(f"{where}: labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.shape[0] != n:
        raise OnnxclpError(f"{where}: {n} images but {y.shape[0]} labels")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise OnnxclpError(f"{where}: labels must be integers")
    elif not np.issubdtype(y.dtype, np.integer):
        raise OnnxclpError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise OnnxclpError(f"{where}: labels must be >= 0, found {int(y.min())}")
    return y


def _image_layout(shape: tuple[int, ...], channels: int | None, where: str) -> str:
    """'hwc' or 'chw' for a 4-D (N, ., ., .) image array; ``channels`` (the model's) breaks ties."""
    last, first = shape[3], shape[1]
    if channels is not None:
        if last == channels and first != channels:
            return "hwc"
        if first == channels and last != channels:
            return "chw"
    if last in _CHANNEL_COUNTS and first not in _CHANNEL_COUNTS:
        return "hwc"
    if first in _CHANNEL_COUNTS and last not in _CHANNEL_COUNTS:
        return "chw"
    if last in _CHANNEL_COUNTS:  # e.g. 3×3×3 images: both readings fit; HWC is what numpy/PIL write
        return "hwc"
    raise OnnxclpError(f"{where}: cannot tell the channel axis of images shaped {shape} (expected HWC or CHW)")


def _check_images(x: np.ndarray, channels: int | None, where: str) -> tuple[np.ndarray, str]:
    if x.ndim == 3:  # (N, H, W) grey images
        x = x[:, :, :, None]
    if x.ndim != 4:
        raise OnnxclpError(f"{where}: images must be (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if x.dtype == np.uint8:
        pass
    elif np.issubdtype(x.dtype, np.floating):
        if x.size:
            lo, hi = float(np.min(x)), float(np.max(x))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
                raise OnnxclpError(
                    f"{where}: float images must lie in [0, 1] (found {lo:g}..{hi:g}); store uint8 or rescale"
                )
        if x.dtype != np.float32:
            x = x.astype(np.float32)
    else:
        raise OnnxclpError(f"{where}: images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    return x, _image_layout(x.shape, channels, where)


# --------------------------------------------------------------------------------------------------------------
# .npz


def load_npz(
    path: str | os.PathLike[str], x_key: str = "x_test", y_key: str = "y_test", channels: int | None = None
) -> ArrayImages:
    """Images ``x_key`` and labels ``y_key`` of an ``.npz`` file (read without pickle)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            for key in (x_key, y_key):
                if key not in keys:
                    raise OnnxclpError(
                        f"{path}: no array {key!r} (it has: {', '.join(keys) or 'nothing'}); "
                        "choose others with --x-key/--y-key"
                    )
            x, y = npz[x_key], npz[y_key]
    except OnnxclpError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise OnnxclpError(f"cannot read {path} as .npz: {exc}") from exc
    where = f"{path}[{x_key}]"
    x, layout = _check_images(x, channels, where)
    y = _check_labels(y, x.shape[0], f"{path}[{y_key}]")
    return ArrayImages(x, y, layout, f"{path} ({x_key}/{y_key})")


# --------------------------------------------------------------------------------------------------------------
# CIFAR python batches


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles of bytes at protocol <= 2 call _codecs.encode(text, "latin1"); allow that codec only.
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("refused _codecs.encode of a non-string")
    return obj.encode("latin-1")


def _safe_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("refused an object dtype")
    return dt


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    # Take the functions from numpy's own pickles, whatever module numpy keeps them in this version.
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only builtin containers, strings, numbers and plain numpy arrays.

    ``find_class`` answers for ndarray reconstruction (``_reconstruct``, ``ndarray``, ``dtype`` without
    objects, ``scalar``, ``_frombuffer``) and latin-1 ``_codecs.encode``; any other global is refused before it
    is imported. ``persistent_load`` is refused too.
    """

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id")


def _restricted_load(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxclpError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise OnnxclpError(f"{path} is not a CIFAR python batch this loader accepts: {exc}") from exc


def _key(d: dict[Any, Any], name: str) -> Any:
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise KeyError(name)


def load_cifar_batch(
    path: str | os.PathLike[str], x_key: str = "data", y_key: str | None = None, channels: int | None = None
) -> ArrayImages:
    """A CIFAR-10/100 python batch (``test_batch``, or CIFAR-100's ``test``): a pickled dict holding ``data``
    (N, 3072) uint8 rows of 3×32×32 CHW pixels and ``labels`` (``fine_labels`` for CIFAR-100)."""
    path = Path(path)
    batch = _restricted_load(path)
    if not isinstance(batch, dict):
        raise OnnxclpError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    keys = ", ".join(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in batch)
    label_keys = [y_key] if y_key else ["labels", "fine_labels"]
    try:
        x = np.asarray(_key(batch, x_key))
    except KeyError:
        raise OnnxclpError(f"{path}: no {x_key!r} entry (it has: {keys}); choose with --x-key") from None
    for name in label_keys:
        try:
            y = np.asarray(_key(batch, name))
            break
        except KeyError:
            continue
    else:
        raise OnnxclpError(f"{path}: no {' or '.join(map(repr, label_keys))} entry (it has: {keys})")
    if x.ndim == 2 and x.shape[1] == 3 * 32 * 32:
        x = x.reshape(-1, 3, 32, 32)
    where = f"{path}[{x_key}]"
    x, layout = _check_images(x, channels, where)
    y = _check_labels(y, x.shape[0], f"{path}[labels]")
    return ArrayImages(x, y, layout, f"CIFAR batch {path}")


# --------------------------------------------------------------------------------------------------------------
# folders


def load_folder(root: str | os.PathLike[str], channels: int = 3, size: tuple[int, int] | None = None) -> FolderImages:
    """An ImageFolder directory: classes are the sorted sub-folder names; files found recursively, sorted."""
    root = Path(root)
    if channels not in (1, 3):
        raise OnnxclpError(f"image folders give grey or RGB images; the model takes {channels} channels")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise OnnxclpError(f"{root}: no class sub-folders (expected one folder of images per class)")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        files.extend(found)
        labels.extend([index] * len(found))
    if not files:
        raise OnnxclpError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return FolderImages(root, files, np.asarray(labels, np.int64), classes, channels, size)


# --------------------------------------------------------------------------------------------------------------
# dispatch


def load_dataset(
    path: str | os.PathLike[str],
    x_key: str | None = None,
    y_key: str | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
) -> ImageSet:
    """Open ``path`` by its kind: ``.npz`` file, CIFAR python batch (file, or a folder holding ``test_batch``
    or CIFAR-100's ``test`` + ``meta``), or an ImageFolder directory.

    ``channels`` (the model's) settles HWC/CHW ties and the colour mode of folder images; ``size`` (H, W)
    resizes folder images as they are decoded (arrays are resized later, as tensors).
    """
    path = Path(path)
    if not path.exists():
        raise OnnxclpError(f"no such data file or folder: {path}")
    if path.is_dir():
        if (path / "test_batch").is_file():
            return load_cifar_batch(path / "test_batch", x_key or "data", y_key, channels)
        if (path / "test").is_file() and (path / "meta").is_file():
            return load_cifar_batch(path / "test", x_key or "data", y_key, channels)
        if x_key or y_key:
            raise OnnxclpError("--x-key/--y-key apply to .npz files and CIFAR batches, not to image folders")
        return load_folder(path, channels or 3, size)
    if path.suffix.lower() == ".npz":
        return load_npz(path, x_key or "x_test", y_key or "y_test", channels)
    with path.open("rb") as fh:
        head = fh.read(2)
    if head[:1] == b"\x80":  # a pickle protocol >= 2 header: a CIFAR batch file given directly
        return load_cifar_batch(path, x_key or "data", y_key, channels)
    raise OnnxclpError(
        f"{path}: unrecognised data (expected an .npz file, a CIFAR python batch, or a folder of class folders)"
    )
