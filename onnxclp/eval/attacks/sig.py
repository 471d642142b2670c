"""SIG: a horizontal sinusoid added to the image."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from onnxclp.eval.attacks.base import Attack, number, register


@register
class SIG(Attack):
    """SIG (docs/algorithms.md, "Attacks"): x' = clip(x + delta·sin(2π·j·f / W), 0, 1), j the column index.

    The same horizontal sinusoid on every row and channel. Defaults delta = 40/255, f = 6 (BackdoorBench).
    SIG is a clean-label attack: at training time only target-class samples are poisoned.
    """

    name = "sig"
    order = 3
    defaults: ClassVar[dict[str, Any]] = {"delta": 40 / 255, "frequency": 6.0}

    def _validate(self) -> None:
        self.params["delta"] = number(self.name, "delta", self.params["delta"], 0.0, 1.0)
        self.params["frequency"] = number(self.name, "frequency", self.params["frequency"], 0.0)

    def signal(self, W: int) -> torch.Tensor:
        """delta·sin(2π·j·f/W) for j = 0..W−1, shape (W,), computed in float64 then rounded once."""
        j = torch.arange(W, dtype=torch.float64)
        s = self.params["delta"] * torch.sin(2 * math.pi * j * self.params["frequency"] / W)
        return s.to(torch.float32)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        s = self.signal(x.shape[-1]).to(x.device, x.dtype)
        return (x + s).clamp_(0.0, 1.0)
