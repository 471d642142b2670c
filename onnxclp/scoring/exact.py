"""``exact``: the operator norm of the circular convolution from the layer's input to channel k at the inferred
input size, strides and dilations included (Sedghi, Gupta & Long, "The Singular Values of Convolutional
Layers", ICLR 2019; docs/algorithms.md, "Scores")."""

from __future__ import annotations

import numpy as np

from onnxclp import scores
from onnxclp.errors import OnnxclpError
from onnxclp.scoring import LayerView, Score, register

# The exact score builds a (C_in, *input size) complex grid per channel: refuse sizes past ~1 GiB of it.
MAX_ELEMS = 2**26


@register
class Exact(Score):
    name = "exact"
    description = "exact L2 operator norm per channel at the inferred input size (circular padding)"
    needs_input_size = True

    def compute(self, view: LayerView) -> np.ndarray | str:
        w = view.float64()
        if view.is_fc:
            return scores.spectral(w)  # an FC row's operator norm is its L2 norm: exact already
        size = view.input_size
        if size is None:
            return "exact score needs the layer's input size, which shape inference could not determine"
        nd = w.ndim - 2
        strides, dilations = view.strides, view.dilations
        if len(strides) != nd or len(dilations) != nd or min((*strides, *dilations), default=1) < 1:
            raise OnnxclpError(
                f"layer {view.key!r}: strides {list(strides)} and dilations {list(dilations)} do not fit a "
                f"{nd}-D kernel"
            )
        if len(size) != nd or min(size, default=1) < 1:
            return f"exact score: shape inference gives the input spatial size {list(size)}, the kernel is {nd}-D"
        if w.shape[1] * int(np.prod(size, dtype=object)) > MAX_ELEMS:
            return f"exact score: an input of {w.shape[1]} x {list(size)} is too large for the DFT of one channel"
        if view.op == "ConvTranspose":
            return scores.exact_transposed(w, size, strides, dilations)
        if any(n % s for n, s in zip(size, strides, strict=True)):
            return f"exact score needs an input size {list(size)} divisible by the strides {list(strides)}"
        return scores.exact(w, size, strides, dilations)
