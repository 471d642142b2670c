"""The score registry: one module per channel score, each a :class:`Score` registered with :func:`register`.

A score receives a :class:`LayerView` (the canonical weight, the paired affine with the BatchNorm statistics
when a BatchNormalization is kept in the graph, the layer's geometry and its inferred input size) and returns
one number per output channel *before* the affine scale, or a string: the reason the layer is skipped. The score
pass (:mod:`onnxclp.passes.score`) multiplies by ``|scale_k|`` (and a Gemm's ``|alpha|``) for every score alike.
The numerics live in :mod:`onnxclp.scores` (pure numpy).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.registry import Registry

__all__ = ["BatchNormStats", "LayerView", "Score", "get", "names", "register"]

# Upper bound on elements of a float64 chunk of a weight converted at once.
CHUNK_ELEMS = 8_000_000


@dataclass(frozen=True)
class BatchNormStats:
    """A kept BatchNormalization's parameters, per channel (float64)."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float


@dataclass
class LayerView:
    """What a score sees of one layer.

    ``weight`` is the canonical ``(K, C_in/group, *kernel)`` array in its stored dtype (a view where possible: use
    :meth:`float64` or :meth:`chunks` to read it checked); ``scale`` the paired affine's per-channel scale;
    ``batchnorm`` the kept BatchNorm's statistics (None when there is none or it was folded); ``input_size`` the
    spatial size of the layer's input from shape inference (only computed for scores with ``needs_input_size``).
    """

    key: str
    op: str
    weight_name: str
    weight: np.ndarray
    is_fc: bool
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int
    scale: np.ndarray | None = None
    batchnorm: BatchNormStats | None = None
    input_size: tuple[int, ...] | None = None

    def float64(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Channels ``lo:hi`` in float64, refused if any value is NaN or Inf."""
        part = self.weight[lo:hi].astype(np.float64)
        if not np.all(np.isfinite(part)):
            raise OnnxclpError(f"layer {self.key!r}: weight {self.weight_name!r} contains NaN or Inf")
        return part

    def chunks(self) -> Iterator[np.ndarray]:
        """The weight a few channels at a time in float64: a large weight is never copied whole."""
        k = self.weight.shape[0]
        step = max(1, CHUNK_ELEMS // max(1, self.weight[:1].size))
        for lo in range(0, k, step):
            yield self.float64(lo, lo + step)


class Score:
    """Base class of a registered score."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_input_size: ClassVar[bool] = False
    needs_batchnorm: ClassVar[bool] = False  # reads BatchNorm statistics: refused with --fuse-bn

    def compute(self, view: LayerView) -> np.ndarray | str:
        raise NotImplementedError


_REGISTRY: Registry[Score] = Registry("score", __name__, __path__)
register = _REGISTRY.register
names = _REGISTRY.names


def get(name: str) -> Score:
    """The registered score ``name``; an unknown name is a usage error."""
    return _REGISTRY.get(name)
