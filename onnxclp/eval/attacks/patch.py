"""A custom (trojan-style) patch with a mask."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from onnxclp.eval.attacks.base import (
    Attack,
    bad,
    file_path,
    integer,
    load_image,
    load_mask,
    number,
    place,
    position_param,
    register,
    seeded_uniform,
)


@register
class Patch(Attack):
    """A custom (trojan-style) patch (docs/algorithms.md, "Attacks"): x' = (1 − m)·x + m·P inside the patch area.

    P is ``image`` (any image file) or, without one, a uniform-random colour patch drawn from ``seed``;
    ``size`` = [h, w] resizes it (default: the image's own size, 5×5 for the random patch). The mask m is
    ``mask`` (a grey-level image, 255 = trigger), else the image's alpha channel, else all ones; it is scaled by
    ``opacity``. ``position`` is a corner name or [row, col] of the top-left pixel (negative: from the end).
    """

    name = "patch"
    order = 6
    defaults: ClassVar[dict[str, Any]] = {
        "image": None,
        "mask": None,
        "size": None,
        "position": "bottom-right",
        "opacity": 1.0,
    }
    path_params = ("image", "mask")

    def _validate(self) -> None:
        p = self.params
        p["image"] = file_path(self.name, "image", p["image"])
        p["mask"] = file_path(self.name, "mask", p["mask"])
        size = p["size"]
        if size is not None:
            if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
                size = [int(size), int(size)]
            if not (isinstance(size, (list, tuple)) and len(size) == 2):
                raise bad(self.name, f"params.size must be [h, w], an integer or null, got {size!r}")
            size = [integer(self.name, "size", v, lo=1) for v in size]
        elif p["image"] is None:
            size = [5, 5]
        p["size"] = size
        p["position"] = position_param(self.name, p["position"])
        p["opacity"] = number(self.name, "opacity", p["opacity"], 0.0, 1.0)

    def pattern(self, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch P (C, h, w) and its mask m (1, h, w), both in [0, 1]."""
        key = ("pattern", C)
        if key not in self._cache:
            p = self.params
            size = tuple(p["size"]) if p["size"] is not None else None
            if p["image"] is not None:
                patch, mask = load_image(p["image"], C, size)
            else:
                assert size is not None
                patch = seeded_uniform(self.seed, (C, *size))
                mask = torch.ones((1, *size))
            if p["mask"] is not None:
                mask = load_mask(p["mask"], tuple(patch.shape[-2:]))
            self._cache[key] = (patch, mask * p["opacity"])
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        patch, mask = self.pattern(C)
        ph, pw = patch.shape[-2:]
        r, c = place(self.name, self.params["position"], ph, pw, H, W)
        out = x.clone()
        m = mask.to(x.device, x.dtype)
        region = out[:, :, r : r + ph, c : c + pw]
        out[:, :, r : r + ph, c : c + pw] = (1 - m) * region + m * patch.to(x.device, x.dtype)
        return out
