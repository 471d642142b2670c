"""What the few-shot methods (ANP, BNP) share: reading the clean images the user gave (``--clean-data``).

Imported only inside a method's ``decide``: it needs torch (the ``eval`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxclp.errors import OnnxclpError

if TYPE_CHECKING:
    import torch

    from onnxclp.pipeline import State

SEED = 0  # which clean images are read when the set holds more than --clean-n


def input_layout(state: State) -> tuple[str, int, tuple[int, int]]:
    """('nchw' or 'nhwc', channels, (H, W)) of the model's image input; a usage error when it is not one. Where
    the graph leaves H and W open (a fully convolutional export with dynamic spatial axes), ``--input-shape
    C,H,W`` (the context's ``input_shape``) gives them, else the size of the clean images given as arrays (an
    .npz, a CIFAR batch: :func:`_image_size`)."""
    from onnxclp.bridge import input_spec

    shape, _ = input_spec(state.model)
    name = state.params.method
    if len(shape) != 4:
        raise OnnxclpError(f"--method {name} reads images: the model's input has rank {len(shape)}")
    given = state.options.context.get("input_shape")
    if given is not None:
        c, h, w = (int(d) for d in given)
        if shape[1] in (c, None) and shape[2] in (h, None) and shape[3] in (w, None):
            return "nchw", c, (h, w)  # all four open: channels first, ONNX's convolution layout
        if shape[3] in (c, None) and shape[1] in (h, None) and shape[2] in (w, None):
            return "nhwc", c, (h, w)
        raise OnnxclpError(f"--input-shape {c},{h},{w} does not fit the model's input shaped {list(shape)}")
    if shape[1] in (1, 3) and shape[2] and shape[3]:
        return "nchw", int(shape[1]), (int(shape[2]), int(shape[3]))
    if shape[3] in (1, 3) and shape[1] and shape[2]:
        return "nhwc", int(shape[3]), (int(shape[1]), int(shape[2]))
    for layout, c in (("nchw", shape[1]), ("nhwc", shape[3])):  # H, W open: the clean images' own size
        if c in (1, 3) and (size := _image_size(state.options.context, int(c))) is not None:
            return layout, int(c), size
    raise OnnxclpError(
        f"--method {name}: cannot tell the image layout of an input shaped {list(shape)} (expected N,C,H,W or "
        "N,H,W,C with 1 or 3 channels and fixed H, W); give the image size with --input-shape C,H,W"
    )


_SIZES: dict[tuple[str, int, Any, Any, int], tuple[int, int] | None] = {}  # (path, mtime, keys, channels) -> (H, W)


def _image_size(ctx: Any, channels: int) -> tuple[int, int] | None:
    """(H, W) of the context's clean images when they are arrays of one size (``clean_arrays``, or a ``clean_data``
    .npz or CIFAR batch); None for an image folder (its images are resized to the model's size, which is what is
    missing), a synthesized set or no images. Read once per set."""
    arrays = ctx.get("clean_arrays")
    if arrays is not None:
        x = np.asarray(arrays[0])
        if x.ndim == 4:
            return (int(x.shape[1]), int(x.shape[2])) if x.shape[-1] == channels else (int(x.shape[2]), int(x.shape[3]))
        return None
    path = ctx.get("clean_data")
    if path is None or str(path).strip().lower().startswith("synthetic") or not Path(path).exists():
        return None
    folder = Path(path).is_dir()
    if folder and not ((Path(path) / "test_batch").is_file() or (Path(path) / "test").is_file()):
        return None  # an image folder: resized to the model's size, which is what is missing
    key = (str(path), Path(path).stat().st_mtime_ns, ctx.get("x_key"), ctx.get("y_key"), channels)
    if key not in _SIZES:
        from onnxclp.eval.data import load_dataset

        data = load_dataset(path, ctx.get("x_key"), ctx.get("y_key"), channels=channels)
        _SIZES[key] = (int(data.height), int(data.width)) if data.height and data.width else None
    return _SIZES[key]


def clean_images(state: State, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The clean labelled images of ``state.options.context`` as the model takes them (normalised with
    ``mean``/``std``, in the model's layout and dtype), their labels, and a description for the report.

    ``context``: ``clean_data`` (a path ``onnxclp.eval.data.load_dataset`` reads: .npz with x_test/y_test or
    the arrays ``x_key``/``y_key``, CIFAR batch, ImageFolder), ``clean_n`` (default 500; a seeded random subset when the set is larger),
    ``mean``, ``std`` (per channel, or None: images in [0, 1] as they are). ``clean_arrays`` (``(x, y,
    description)``: images already loaded, (N, H, W, C) or (N, C, H, W), uint8 or float in [0, 1], as
    ``load_dataset`` checks them; e.g. ``onnxclp grid``'s clean set, shared once per worker) is used instead of
    ``clean_data`` when given. ``n`` replaces ``clean_n`` (a saved synthetic set is read whole).
    """
    import torch

    from onnxclp.defences._inputs import normaliser, to_model
    from onnxclp.eval.data import ArrayImages, _check_images, _check_labels, load_dataset

    ctx = state.options.context
    name = state.params.method
    arrays = ctx.get("clean_arrays")
    path = ctx.get("clean_data") if arrays is None else arrays[2]
    if path is None:
        raise OnnxclpError(f"--method {name} needs clean labelled images: give --clean-data")
    n = int(n if n is not None else ctx.get("clean_n") or 500)
    if n < 1:
        raise OnnxclpError(f"--clean-n must be >= 1, got {n}")
    layout, channels, hw = input_layout(state)
    if arrays is not None:  # already loaded (onnxclp grid shares them once per worker): the checks load_npz makes
        xs, xs_layout = _check_images(np.asarray(arrays[0]), channels, str(path))
        data = ArrayImages(xs, _check_labels(np.asarray(arrays[1]), xs.shape[0], str(path)), xs_layout, str(path))
    else:
        data = load_dataset(path, ctx.get("x_key"), ctx.get("y_key"), channels=channels, size=hw)
    if len(data) == 0:
        raise OnnxclpError(f"{path}: no images")
    idx = np.arange(len(data))
    if len(data) > n:
        idx = np.sort(np.random.default_rng(SEED).permutation(len(data))[:n])
    x = data.images(idx)
    resized = ""
    if x.shape[1] == channels and tuple(x.shape[2:]) != tuple(hw):  # arrays of another size: as evaluate's --input-size
        import torch.nn.functional as F

        resized = f", resized from {x.shape[2]}x{x.shape[3]} to the model's {hw[0]}x{hw[1]} (bilinear)"
        x = F.interpolate(x.float(), size=tuple(hw), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    if tuple(x.shape[1:]) != (channels, *hw):
        raise OnnxclpError(f"{path}: images are {tuple(x.shape[1:])} (C, H, W); the model takes {(channels, *hw)}")
    try:
        norm = normaliser((channels, *hw), ctx.get("mean"), ctx.get("std"), 1, "cpu")
    except ValueError as exc:
        raise OnnxclpError(f"--mean/--std: {exc}") from exc
    x = to_model(x.to(torch.float32), norm)
    if layout == "nhwc":
        x = x.permute(0, 2, 3, 1).contiguous()
    y = torch.as_tensor(np.asarray(data.labels)[idx], dtype=torch.long)
    what = f"{len(idx)} clean images from {path}{resized}"
    return x, y, what


def check_labels(labels: Any, classes: int, path: Any) -> None:
    """Labels must index the model's classes."""
    top = int(labels.max()) if len(labels) else 0
    if top >= classes or int(labels.min()) < 0:
        raise OnnxclpError(f"{path}: labels run to {top}, the model has {classes} classes")
