"""The identity attack (``none``): a model's baseline on the attacked subset."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from onnxclp.eval.attacks.base import Attack, register


@register
class NoAttack(Attack):
    """The identity: measures a model's clean behaviour on the attacked subset (its baseline ASR)."""

    name = "none"
    order = 0
    defaults: ClassVar[dict[str, Any]] = {}

    def _validate(self) -> None:
        pass

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()
