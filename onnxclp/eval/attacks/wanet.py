"""WaNet: a fixed smooth warp of the image."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from onnxclp.eval.attacks.base import Attack, bad, file_path, integer, number, register, seeded_uniform

GRID_KINDS = ("field", "noise", "sampling")
# A sampling grid (what grid_sample receives) is the identity plus a warp of a few pixels, clamped to [-1, 1]:
# mean |grid - identity| of a WaNet grid is about s·0.7/H (0.01 for s = 0.5 on 32×32 images). An array within
# [-1, 1] and closer than this to the identity is evidently a sampling grid; one with values outside [-1, 1]
# cannot be one (WaNet clamps it) and is evidently BackdoorBench's upsampled noise grid. Anything else is
# refused: the two kinds have the same shape.
SAMPLING_MAX_DEVIATION = 0.2


def identity_grid(H: int, W: int) -> np.ndarray:
    """The identity sampling grid (H, W, 2) of ``grid_sample`` with align_corners=True: (x, y) in [-1, 1]."""
    ys, xs = np.linspace(-1, 1, H), np.linspace(-1, 1, W)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack((xx, yy), axis=2)


def grid_kind_of(arr: np.ndarray) -> str | None:
    """``sampling`` or ``noise`` for an (H, W, 2) array when evident (rule above), else None."""
    dev = float(np.abs(arr.astype(np.float64) - identity_grid(arr.shape[0], arr.shape[1])).mean())
    inside = float(np.abs(arr).max()) <= 1 + 1e-6
    if inside and dev <= SAMPLING_MAX_DEVIATION:
        return "sampling"
    if not inside and dev > SAMPLING_MAX_DEVIATION:
        return "noise"
    return None


@register
class WaNet(Attack):
    """WaNet (docs/algorithms.md, "Attacks"): warp every image with one fixed smooth displacement field.

    grid = clamp((identity + s·U/H)·grid_rescale, −1, 1), U = bicubic upsampling (align_corners=True) to H×W of
    a 2×k×k field uniform in [−1, 1] divided by its mean absolute value; x' = grid_sample(x, grid, bilinear,
    zero padding, align_corners=True). As in BackdoorBench, channel 0 of the field moves along the width,
    channel 1 along the height. The field is drawn from ``seed``, or read from ``grid``, a ``.npy`` file of the
    kind ``grid_kind`` names:

    - ``field``: the normalised field (2, k, k) / (1, 2, k, k) (see :meth:`save_field`);
    - ``noise``: BackdoorBench's upsampled ``noise_grid`` U, (H, W, 2) / (1, H, W, 2);
    - ``sampling``: the final sampling grid handed to ``grid_sample``, (H, W, 2) / (1, H, W, 2): used as it is
      (``s`` and ``grid_rescale`` are already in it and are not applied again).

    ``grid_kind`` null: read from the array when evident ((2, k, k): a field; (H, W, 2) within [-1, 1] and
    close to the identity: a sampling grid; (H, W, 2) with values outside [-1, 1]: a noise grid), else refused
    with a message. The kind used is written back into ``params`` (and so into a saved configuration).
    Defaults k = 4, s = 0.5, grid_rescale = 1 (BackdoorBench).
    """

    name = "wanet"
    order = 4
    defaults: ClassVar[dict[str, Any]] = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "grid": None, "grid_kind": None}
    path_params = ("grid",)

    def _validate(self) -> None:
        p = self.params
        p["k"] = integer(self.name, "k", p["k"], lo=2)
        p["s"] = number(self.name, "s", p["s"])
        p["grid_rescale"] = number(self.name, "grid_rescale", p["grid_rescale"])
        p["grid"] = file_path(self.name, "grid", p["grid"])
        kind = p["grid_kind"]
        if kind is not None and kind not in GRID_KINDS:
            raise bad(self.name, f"params.grid_kind must be one of {', '.join(GRID_KINDS)} or null, got {kind!r}")
        self._field: torch.Tensor | None = None
        self._noise_grid: torch.Tensor | None = None
        self._sampling_grid: torch.Tensor | None = None
        if p["grid"] is None:
            if kind is not None:
                raise bad(self.name, f"params.grid_kind {kind} needs params.grid (a .npy file)")
            return
        try:
            arr = np.load(p["grid"], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise bad(self.name, f"cannot read params.grid {p['grid']}: {exc}") from exc
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise bad(self.name, f"params.grid must hold a finite float array, got {arr.dtype} {arr.shape}")
        is_field = arr.shape[0] == 2 and arr.shape[1] == arr.shape[2]
        is_hw2 = arr.shape[2] == 2
        if kind is None:
            if is_field and not is_hw2:
                kind = "field"
            elif is_hw2 and not is_field:
                kind = grid_kind_of(arr)
                if kind is None:
                    raise bad(
                        self.name,
                        f"params.grid {p['grid']} {arr.shape} could be a sampling grid or a noise grid (same shape; "
                        "values within [-1, 1] but not close to the identity grid): say which with --grid-kind "
                        "sampling|noise (params.grid_kind)",
                    )
            else:
                raise bad(
                    self.name,
                    f"params.grid must be (2, k, k) or (H, W, 2), got shape {arr.shape}"
                    + (" (both fit: give --grid-kind)" if is_field and is_hw2 else ""),
                )
        if kind == "field":
            if not is_field:
                raise bad(self.name, f"params.grid_kind field needs a (2, k, k) array, got shape {arr.shape}")
            self._field = torch.from_numpy(arr.astype(np.float32))[None]
            p["k"] = int(arr.shape[1])
        elif not is_hw2:
            raise bad(self.name, f"params.grid_kind {kind} needs an (H, W, 2) array, got shape {arr.shape}")
        elif kind == "noise":
            self._noise_grid = torch.from_numpy(arr.astype(np.float32))[None]
        else:
            self._sampling_grid = torch.from_numpy(arr.astype(np.float64))[None]
        p["grid_kind"] = kind

    def field(self) -> torch.Tensor:
        """The normalised (1, 2, k, k) random field."""
        if self._noise_grid is not None or self._sampling_grid is not None:
            raise bad(self.name, f"params.grid holds a {self.params['grid_kind']} grid, not a k×k field")
        if self._field is None:
            k = self.params["k"]
            ins = seeded_uniform(self.seed, (1, 2, k, k)) * 2 - 1
            self._field = ins / ins.abs().mean()
        return self._field

    def save_field(self, path: str | os.PathLike[str]) -> None:
        """Write the normalised (2, k, k) field as ``.npy``, for ``params.grid``."""
        np.save(path, self.field()[0].numpy())

    def warp_grid(self, H: int, W: int) -> torch.Tensor:
        """The sampling grid (1, H, W, 2), float64, fed to ``grid_sample`` (which runs in float64)."""
        key = ("grid", H, W)
        if key not in self._cache:
            p = self.params
            if self._sampling_grid is not None:
                grid = self._sampling_grid
                if grid.shape[1:3] != (H, W):
                    raise bad(
                        self.name,
                        f"params.grid is a {grid.shape[1]}×{grid.shape[2]} sampling grid but images are {H}×{W}",
                    )
                self._cache[key] = grid
                return grid
            if self._noise_grid is not None:
                noise = self._noise_grid
                if noise.shape[1:3] != (H, W):
                    raise bad(
                        self.name,
                        f"params.grid is a {noise.shape[1]}×{noise.shape[2]} noise grid but images are {H}×{W}",
                    )
            else:
                noise = F.interpolate(self.field(), size=(H, W), mode="bicubic", align_corners=True)
                noise = noise.permute(0, 2, 3, 1)
            # float64 so that s = 0 samples every pixel exactly at its centre: the warp is then the identity
            ys = torch.linspace(-1, 1, steps=H, dtype=torch.float64)
            xs = torch.linspace(-1, 1, steps=W, dtype=torch.float64)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            identity = torch.stack((xx, yy), dim=2)[None]
            grid = (identity + p["s"] * noise.to(torch.float64) / H) * p["grid_rescale"]
            self._cache[key] = grid.clamp(-1, 1)
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        N, _, H, W = x.shape
        grid = self.warp_grid(H, W).to(x.device).expand(N, H, W, 2)
        out = F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.to(x.dtype)
