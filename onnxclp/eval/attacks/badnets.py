"""BadNets: a patch pasted at a corner or position."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from onnxclp.eval.attacks.base import (
    Attack,
    bad,
    file_path,
    integer,
    load_image,
    number,
    place,
    position_param,
    register,
)


@register
class BadNets(Attack):
    """BadNets (docs/algorithms.md, "Attacks"): a square ``size``×``size`` patch of ``value`` pasted at ``position``.

    ``value`` is one number or one per channel. With ``image`` (a file), the patch is that image at its own
    size (``size`` is then unused), pasted through its alpha channel when it has one.
    Default: a 3×3 white patch in the bottom-right corner (BackdoorBench, CIFAR-10).
    """

    name = "badnets"
    order = 1
    defaults: ClassVar[dict[str, Any]] = {"size": 3, "position": "bottom-right", "value": 1.0, "image": None}
    path_params = ("image",)

    def _validate(self) -> None:
        p = self.params
        p["size"] = integer(self.name, "size", p["size"], lo=1)
        p["position"] = position_param(self.name, p["position"])
        value = p["value"]
        if isinstance(value, (list, tuple)):
            p["value"] = [number(self.name, "value", v, 0.0, 1.0) for v in value]
            if not p["value"]:
                raise bad(self.name, "params.value must not be empty")
        else:
            p["value"] = number(self.name, "value", value, 0.0, 1.0)
        p["image"] = file_path(self.name, "image", p["image"])

    def _patch(self, C: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = ("patch", C)
        if key not in self._cache:
            p = self.params
            if p["image"] is not None:
                patch, alpha = load_image(p["image"], C)
                self._cache[key] = (patch, None if bool((alpha == 1).all()) else alpha)
            else:
                value = torch.tensor(p["value"], dtype=torch.float32).reshape(-1, 1, 1)
                if value.shape[0] not in (1, C):
                    raise bad(self.name, f"params.value has {value.shape[0]} entries for {C}-channel images")
                self._cache[key] = (value.expand(C, p["size"], p["size"]).clone(), None)
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        patch, alpha = self._patch(C)
        ph, pw = patch.shape[-2:]
        r, c = place(self.name, self.params["position"], ph, pw, H, W)
        out = x.clone()
        patch = patch.to(x.device, x.dtype)
        if alpha is None:
            out[:, :, r : r + ph, c : c + pw] = patch
        else:
            a = alpha.to(x.device, x.dtype)
            region = out[:, :, r : r + ph, c : c + pw]
            out[:, :, r : r + ph, c : c + pw] = (1 - a) * region + a * patch
        return out
