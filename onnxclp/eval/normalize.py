"""The input normalisation a model records in its metadata (``metadata_props``), so that a model is evaluated as it
was trained without ``--mean/--std`` (README, "Commands").

Keys read, first found wins:

- ``onnxclp.normalize`` (:data:`NORMALIZE_KEY`): JSON ``{"mean": [R, G, B], "std": [R, G, B]}``, the images in
  [0, 1] fed as ``(x - mean) / std``. onnxclp writes it (:func:`set_normalization`); so can an exporter script:
  ``onnx.helper.set_model_props(model, {"onnxclp.normalize": json.dumps({"mean": [...], "std": [...]})})``.
- ``Image.NominalPixelRange`` (ONNX's image metadata, docs/MetadataProps.md of the ONNX repository; Windows ML):
  ``Normalized_0_1`` (no normalisation), ``Normalized_1_1`` ([-1, 1]: mean 0.5, std 0.5), ``NominalRange_0_255``
  (pixels 0..255: std 1/255), ``NominalRange_16_235`` (video range).
- ``standardization_mean`` and ``standardization_std`` (JSON lists; as the QGIS Deepness plugin's models carry).

A model whose image input is 8-bit (``uint8``: TensorFlow and TFLite conversions, models that normalise inside)
takes pixels 0..255: :func:`input_normalization` reads that as mean 0, std 1/255 when nothing is recorded, and the
runners round to integers where they feed onnxruntime.

No torch, no onnxruntime: ``sanitize`` can write the key and read it without the ``eval`` extra.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from onnxclp.errors import OnnxclpError

__all__ = [
    "EIGHT_BIT",
    "NORMALIZE_KEY",
    "eight_bit_normalization",
    "input_normalization",
    "normalization_from_metadata",
    "normalization_metadata",
    "read_normalization",
    "set_normalization",
]

NORMALIZE_KEY = "onnxclp.normalize"
EIGHT_BIT = "8-bit image input: pixels 0..255"  # the source input_normalization names for a uint8 input

# ONNX's Image.NominalPixelRange: the model's input range, as (mean, std) on images in [0, 1].
_PIXEL_RANGES: dict[str, tuple[list[float], list[float]]] = {
    "Normalized_0_1": ([0.0], [1.0]),
    "Normalized_1_1": ([0.5], [0.5]),
    "NominalRange_0_255": ([0.0], [1.0 / 255.0]),
    "NominalRange_16_235": ([-16.0 / 219.0], [1.0 / 219.0]),
}


def _numbers(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or not value or len(value) > 64:
        raise ValueError(f"{what}: expected a list of 1 to 64 numbers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
            raise ValueError(f"{what}: expected finite numbers")
        out.append(float(v))
    return out


def _check(mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    if any(s <= 0 for s in std):
        raise ValueError("std values must be > 0")
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise ValueError(f"{len(mean)} mean values for {len(std)} std values")
    return mean, std


def read_normalization(props: Mapping[str, str]) -> tuple[list[float], list[float], str] | None:
    """``(mean, std, key)`` from a model's metadata (key -> value), or None when it records none. A recorded
    value that cannot be read is an :class:`OnnxclpError` naming the key (``--mean/--std`` override it)."""
    try:
        if NORMALIZE_KEY in props:
            d = json.loads(props[NORMALIZE_KEY])
            if not isinstance(d, dict):
                raise ValueError('expected {"mean": [...], "std": [...]}')
            mean, std = _check(_numbers(d.get("mean"), "mean"), _numbers(d.get("std"), "std"))
            return mean, std, NORMALIZE_KEY
        pixel_range = props.get("Image.NominalPixelRange")
        if pixel_range is not None:
            if pixel_range not in _PIXEL_RANGES:
                raise ValueError(f"unknown range {pixel_range[:40]!r} (known: {', '.join(_PIXEL_RANGES)})")
            mean, std = _PIXEL_RANGES[pixel_range]
            return list(mean), list(std), "Image.NominalPixelRange"
        if "standardization_mean" in props and "standardization_std" in props:
            mean = _numbers(json.loads(props["standardization_mean"]), "standardization_mean")
            std = _numbers(json.loads(props["standardization_std"]), "standardization_std")
            return *_check(mean, std), "standardization_mean/std"
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        key = next(k for k in (NORMALIZE_KEY, "Image.NominalPixelRange", "standardization_mean") if k in props)
        raise OnnxclpError(
            f"the model's metadata {key!r} cannot be read as a normalisation ({exc}); give --mean/--std"
        ) from None
    return None


def _props(model: Any) -> Mapping[str, str]:
    if isinstance(model, Mapping):
        return model
    if isinstance(model, str | os.PathLike):
        import onnx

        try:  # the metadata only: no external data is followed
            model = onnx.load(os.fspath(model), load_external_data=False)
        except Exception as exc:
            raise OnnxclpError(f"{os.fspath(model)}: cannot read the model's metadata ({exc})") from None
    elif isinstance(model, bytes | bytearray):
        import onnx

        model = onnx.load_from_string(bytes(model))
    return {p.key: p.value for p in model.metadata_props}


def normalization_from_metadata(model: Any) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` recorded in a model's metadata, or None. ``model``: a ModelProto, a path, serialized bytes,
    or the metadata itself (a mapping, as onnxruntime's ``get_modelmeta().custom_metadata_map``)."""
    found = read_normalization(_props(model))
    return None if found is None else (found[0], found[1])


def eight_bit_input(model: Any) -> bool:
    """Whether the first graph input that is not an initializer is a ``uint8`` tensor (pixels 0..255)."""
    from onnx import TensorProto

    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name not in inits:
            return vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == TensorProto.UINT8
    return False


def input_normalization(model: Any) -> tuple[list[float], list[float], str] | None:
    """``(mean, std, source)`` of a ModelProto's input when ``--mean/--std`` are not given: the normalisation its
    metadata records (:func:`read_normalization`; ``source`` the key), else mean 0 and std 1/255 for an 8-bit input
    (``source`` :data:`EIGHT_BIT`), else None (images in [0, 1] as they are)."""
    found = read_normalization(_props(model))
    if found is not None:
        return found
    if eight_bit_input(model):
        return *eight_bit_normalization(), EIGHT_BIT
    return None


def eight_bit_normalization() -> tuple[list[float], list[float]]:
    """``(mean, std)`` of pixels 0..255 on images in [0, 1]: ONNX's ``NominalRange_0_255``, an 8-bit input's."""
    mean, std = _PIXEL_RANGES["NominalRange_0_255"]
    return list(mean), list(std)


def normalization_metadata(mean: Sequence[float], std: Sequence[float]) -> dict[str, str]:
    """The metadata entry that records ``mean``/``std`` (:data:`NORMALIZE_KEY` -> JSON)."""
    m, s = _check(_numbers([float(x) for x in mean], "mean"), _numbers([float(x) for x in std], "std"))
    return {NORMALIZE_KEY: json.dumps({"mean": m, "std": s})}


def set_normalization(model: Any, mean: Sequence[float], std: Sequence[float]) -> None:
    """Record ``mean``/``std`` in a ModelProto's ``metadata_props`` (replacing an earlier :data:`NORMALIZE_KEY`)."""
    entry = normalization_metadata(mean, std)
    for p in model.metadata_props:
        if p.key == NORMALIZE_KEY:
            p.value = entry[NORMALIZE_KEY]
            return
    prop = model.metadata_props.add()
    prop.key, prop.value = NORMALIZE_KEY, entry[NORMALIZE_KEY]
