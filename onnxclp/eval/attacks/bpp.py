"""BPP: colour quantisation."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from onnxclp.eval.attacks.base import Attack, integer, register


@register
class BPP(Attack):
    """BPP (docs/algorithms.md, "Attacks"): colour quantisation, x' = round(x·(levels−1))/(levels−1); default 8 levels.

    ``round`` is torch's round-half-to-even. For 8-bit images (x = v/255) no tie can occur: v·(levels−1)/255
    is never an odd multiple of 1/2, because 2·v·(levels−1) is even and 255·(2m+1) is odd.
    """

    name = "bpp"
    order = 5
    defaults: ClassVar[dict[str, Any]] = {"levels": 8}

    def _validate(self) -> None:
        self.params["levels"] = integer(self.name, "levels", self.params["levels"], lo=2)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        q = self.params["levels"] - 1
        return torch.round(x * q) / q
