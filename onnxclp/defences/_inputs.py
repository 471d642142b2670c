"""Synthetic inputs in a model's value range: images in [lo, hi], optionally normalised per channel."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticInput:
    """The synthetic images a data-free defence makes (MM-BD's searched images, OTBR's noise) and how the model
    takes them: one image's ``shape`` (no batch dimension), values in ``[lo, hi]``, fed as ``(x - mean) / std``
    along ``channel_axis`` of the batched tensor (1 for NCHW, -1 for NHWC) when ``mean``/``std`` are given, on
    ``device``."""

    shape: tuple[int, ...]
    lo: float = 0.0
    hi: float = 1.0
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    channel_axis: int = 1
    device: str | torch.device = "cpu"

    @classmethod
    def of(cls, inputs: SyntheticInput | Sequence[int]) -> SyntheticInput:
        """``inputs`` itself, or the defaults for a plain image shape."""
        return inputs if isinstance(inputs, SyntheticInput) else cls(tuple(int(d) for d in inputs))

    def normaliser(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`normaliser` of these inputs (on ``device``, default theirs)."""
        return normaliser(self.shape, self.mean, self.std, self.channel_axis, self.device if device is None else device)


def normaliser(
    input_shape: Sequence[int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channel_axis: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) shaped to broadcast over a batch of ``input_shape`` images, or None without normalisation.

    ``channel_axis`` counts in the batched tensor (1 for NCHW, -1 for NHWC). A single value applies to every
    channel. Raises ValueError for a length that is neither 1 nor the channel count, or a std that is not > 0.
    """
    if mean is None and std is None:
        return None
    rank = len(input_shape) + 1
    axis = channel_axis + rank if channel_axis < 0 else channel_axis
    if not 1 <= axis < rank:
        raise ValueError(f"channel axis {channel_axis} is outside an input of shape {tuple(input_shape)}")
    channels = int(input_shape[axis - 1])
    shape = [1] * rank
    shape[axis] = channels
    out = []
    for name, vals, default in (("mean", mean, 0.0), ("std", std, 1.0)):
        v = [default] if vals is None else [float(x) for x in vals]
        if len(v) not in (1, channels):
            raise ValueError(f"{name} has {len(v)} values for {channels} channels")
        t = torch.tensor(v * channels if len(v) == 1 else v, dtype=torch.float32, device=device)
        out.append(t.reshape(shape))
    if not bool((out[1] > 0).all()):
        raise ValueError("std must be > 0 for every channel")
    return out[0], out[1]


def to_model(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Images in the caller's range -> what the model takes."""
    return x if norm is None else (x - norm[0]) / norm[1]
