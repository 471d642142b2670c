"""Blended: the whole image blended with a pattern."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from onnxclp.eval.attacks.base import Attack, file_path, load_image, number, register, seeded_uniform


@register
class Blended(Attack):
    """Blended (docs/algorithms.md, "Attacks"): x' = (1 − alpha)·x + alpha·P over the whole image.

    P is ``image`` resized to the input size (bilinear), or, without one, a uniform-random pattern of the
    input's shape drawn from ``seed``. Default alpha 0.2 (BackdoorBench).
    """

    name = "blended"
    order = 2
    defaults: ClassVar[dict[str, Any]] = {"alpha": 0.2, "image": None}
    path_params = ("image",)

    def _validate(self) -> None:
        self.params["alpha"] = number(self.name, "alpha", self.params["alpha"], 0.0, 1.0)
        self.params["image"] = file_path(self.name, "image", self.params["image"])

    def pattern(self, C: int, H: int, W: int) -> torch.Tensor:
        """The blend pattern P, (C, H, W) in [0, 1]."""
        key = ("pattern", C, H, W)
        if key not in self._cache:
            if self.params["image"] is not None:
                self._cache[key] = load_image(self.params["image"], C, (H, W))[0]
            else:
                self._cache[key] = seeded_uniform(self.seed, (C, H, W))
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        alpha = self.params["alpha"]
        P = self.pattern(C, H, W).to(x.device, x.dtype)
        return (1 - alpha) * x + alpha * P
