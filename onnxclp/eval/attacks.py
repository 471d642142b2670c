"""Backdoor triggers in torch, for evaluation and for training the model zoo (ALGORITHMS.md section 6).

Every trigger works on a batch ``x`` of shape (N, C, H, W), float, in [0, 1], *before* normalisation, and is
vectorised over the batch. Every trigger is a pure function of its parameters and one integer seed: the same
configuration gives the same pixels on every machine, so the trigger a model was poisoned with can be
reproduced exactly at evaluation time.

The attack configuration file (written by the model-zoo trainer, read by ``onnxclp evaluate --attack-config``)::

    {"attack": "badnets", "target": 0, "mode": "a2o", "seed": 0,
     "params": {... every parameter of the attack, defaults filled in ...},
     "normalize": {"mean": [...], "std": [...]}}          # optional

Label rules (ALGORITHMS.md section 1): all-to-one (``a2o``) sends every triggered sample to ``target`` and only
samples whose true label is not ``target`` count; all-to-all (``a2a``) sends label y to (y + 1) mod C.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from onnxclp.errors import OnnxclpError

__all__ = [
    "ATTACKS",
    "BPP",
    "SIG",
    "Attack",
    "AttackConfig",
    "BadNets",
    "Blended",
    "NoAttack",
    "Patch",
    "WaNet",
    "attacked_mask",
    "build_attack",
    "load_attack_config",
    "save_attack_config",
    "target_labels",
]

MODES = ("a2o", "a2a")
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


# --------------------------------------------------------------------------------------------------------------
# label rules (ALGORITHMS.md section 1)


def attacked_mask(y: np.ndarray, target: int, mode: str) -> np.ndarray:
    """Which samples are triggered and counted for ASR/RA: a2o excludes the target class, a2a keeps all."""
    y = np.asarray(y)
    if mode == "a2o":
        return y != target
    if mode == "a2a":
        return np.ones(y.shape, dtype=bool)
    raise OnnxclpError(f"unknown attack mode {mode!r} (expected one of {', '.join(MODES)})")


def target_labels(y: np.ndarray, target: int, mode: str, num_classes: int) -> np.ndarray:
    """The label a successful attack produces for each true label ``y``: ``target`` (a2o) or (y+1) mod C (a2a)."""
    y = np.asarray(y, dtype=np.int64)
    if mode == "a2o":
        return np.full_like(y, target)
    if mode == "a2a":
        return (y + 1) % num_classes
    raise OnnxclpError(f"unknown attack mode {mode!r} (expected one of {', '.join(MODES)})")


# --------------------------------------------------------------------------------------------------------------
# parameter helpers


def _bad(attack: str, message: str) -> OnnxclpError:
    return OnnxclpError(f"{attack}: {message}")


def _number(attack: str, key: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(attack, f"params.{key} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(attack, f"params.{key} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def _integer(attack: str, key: str, value: Any, lo: int | None = None) -> int:
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise _bad(attack, f"params.{key} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise _bad(attack, f"params.{key} must be at least {lo}, got {value}")
    return value


def _path(attack: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _bad(attack, f"params.{key} must be a file path or null, got {value!r}")
    path = Path(value)
    if not path.is_file():
        raise _bad(attack, f"params.{key}: no such file: {path}")
    return str(value)


def _position(attack: str, value: Any) -> str | list[int]:
    """A corner name or [row, col] of the patch's top-left pixel (negative: counted from the bottom/right)."""
    if isinstance(value, str):
        if value not in CORNERS:
            raise _bad(attack, f"params.position must be one of {', '.join(CORNERS)} or [row, col], got {value!r}")
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        return [int(value[0]), int(value[1])]
    raise _bad(attack, f"params.position must be a corner name or [row, col], got {value!r}")


def _place(attack: str, position: str | list[int], ph: int, pw: int, H: int, W: int) -> tuple[int, int]:
    """Top-left pixel of a ph×pw patch in an H×W image; the patch must fit entirely."""
    if isinstance(position, str):
        row = H - ph if position.startswith("bottom") else 0
        col = W - pw if position.endswith("right") else 0
    else:
        row, col = position
        row = row + H if row < 0 else row
        col = col + W if col < 0 else col
    if ph > H or pw > W or row < 0 or col < 0 or row + ph > H or col + pw > W:
        raise _bad(attack, f"a {ph}×{pw} patch at {position} does not fit in a {H}×{W} image")
    return row, col


def _load_image(path: str, channels: int, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file as (C, h, w) float in [0, 1] plus its alpha (1, h, w) (ones when it has none).

    ``size`` = (h, w) resizes it (bilinear for the colours, nearest for the alpha, via Pillow).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
            alpha = img.convert("RGBA").getchannel("A") if has_alpha else None
            colour = img.convert("L" if channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise OnnxclpError(f"cannot read image {path}: {exc}") from exc
    if size is not None and colour.size != (size[1], size[0]):
        colour = colour.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        if alpha is not None:
            alpha = alpha.resize((size[1], size[0]), Image.Resampling.NEAREST)
    arr = np.asarray(colour, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if channels not in (1, 3):  # e.g. 4-channel inputs: repeat the grey level
        arr = np.repeat(arr.mean(axis=0, keepdims=True), channels, axis=0)
    a = np.ones((1, *arr.shape[1:]), np.float32) if alpha is None else np.asarray(alpha, np.float32)[None] / 255
    return torch.from_numpy(np.ascontiguousarray(arr)), torch.from_numpy(np.ascontiguousarray(a))


def _load_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A mask image as (1, h, w) in [0, 1] (grey level / 255), resized to ``size`` with nearest neighbours."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = img.convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise OnnxclpError(f"cannot read mask image {path}: {exc}") from exc
    if grey.size != (size[1], size[0]):
        grey = grey.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32)[None] / 255.0)


def _seeded_uniform(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) numbers from torch's CPU generator: identical on every machine for a given seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(shape, generator=gen, dtype=torch.float32)


def _check_batch(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise _bad(name, f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise _bad(name, f"expected float images in [0, 1], got dtype {x.dtype}")


# --------------------------------------------------------------------------------------------------------------
# attacks


class Attack(ABC):
    """A trigger: ``apply`` maps clean images in [0, 1] to triggered ones, deterministically.

    Subclasses declare ``name``, ``defaults`` (every parameter and its default, BackdoorBench's where it has
    one) and ``path_params`` (parameters holding file paths, resolved relative to a configuration file).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    path_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise _bad(self.name, f"unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})")
        self.seed = _integer(self.name, "seed", seed)
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._validate()
        self._cache: dict[tuple[Any, ...], Any] = {}

    @abstractmethod
    def _validate(self) -> None:
        """Check and normalise ``self.params`` in place; raise OnnxclpError with a one-line reason."""

    @abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor: ...

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Triggered copy of ``x`` (N, C, H, W) float in [0, 1]; ``x`` itself is left untouched."""
        _check_batch(self.name, x)
        if x.shape[0] == 0:
            return x.clone()
        return self._apply(x)

    __call__ = apply

    def config(self) -> dict[str, Any]:
        """Every parameter of this attack with defaults filled in (the ``params`` of the configuration file)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, params={self.config()})"


class NoAttack(Attack):
    """The identity: measures a model's clean behaviour on the attacked subset (its baseline ASR)."""

    name = "none"
    defaults: ClassVar[dict[str, Any]] = {}

    def _validate(self) -> None:
        pass

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class BadNets(Attack):
    """BadNets (ALGORITHMS.md section 6): a square ``size``×``size`` patch of ``value`` pasted at ``position``.

    ``value`` is one number or one per channel. With ``image`` (a file), the patch is that image at its own
    size (``size`` is then unused), pasted through its alpha channel when it has one.
    Default: a 3×3 white patch in the bottom-right corner (BackdoorBench, CIFAR-10).
    """

    name = "badnets"
    defaults: ClassVar[dict[str, Any]] = {"size": 3, "position": "bottom-right", "value": 1.0, "image": None}
    path_params = ("image",)

    def _validate(self) -> None:
        p = self.params
        p["size"] = _integer(self.name, "size", p["size"], lo=1)
        p["position"] = _position(self.name, p["position"])
        value = p["value"]
        if isinstance(value, (list, tuple)):
            p["value"] = [_number(self.name, "value", v, 0.0, 1.0) for v in value]
            if not p["value"]:
                raise _bad(self.name, "params.value must not be empty")
        else:
            p["value"] = _number(self.name, "value", value, 0.0, 1.0)
        p["image"] = _path(self.name, "image", p["image"])

    def _patch(self, C: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = ("patch", C)
        if key not in self._cache:
            p = self.params
            if p["image"] is not None:
                patch, alpha = _load_image(p["image"], C)
                self._cache[key] = (patch, None if bool((alpha == 1).all()) else alpha)
            else:
                value = torch.tensor(p["value"], dtype=torch.float32).reshape(-1, 1, 1)
                if value.shape[0] not in (1, C):
                    raise _bad(self.name, f"params.value has {value.shape[0]} entries for {C}-channel images")
                self._cache[key] = (value.expand(C, p["size"], p["size"]).clone(), None)
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        patch, alpha = self._patch(C)
        ph, pw = patch.shape[-2:]
        r, c = _place(self.name, self.params["position"], ph, pw, H, W)
        out = x.clone()
        patch = patch.to(x.device, x.dtype)
        if alpha is None:
            out[:, :, r : r + ph, c : c + pw] = patch
        else:
            a = alpha.to(x.device, x.dtype)
            region = out[:, :, r : r + ph, c : c + pw]
            out[:, :, r : r + ph, c : c + pw] = (1 - a) * region + a * patch
        return out


class Blended(Attack):
    """Blended (ALGORITHMS.md section 6): x' = (1 − alpha)·x + alpha·P over the whole image.

    P is ``image`` resized to the input size (bilinear), or, without one, a uniform-random pattern of the
    input's shape drawn from ``seed``. Default alpha 0.2 (BackdoorBench).
    """

    name = "blended"
    defaults: ClassVar[dict[str, Any]] = {"alpha": 0.2, "image": None}
    path_params = ("image",)

    def _validate(self) -> None:
        self.params["alpha"] = _number(self.name, "alpha", self.params["alpha"], 0.0, 1.0)
        self.params["image"] = _path(self.name, "image", self.params["image"])

    def pattern(self, C: int, H: int, W: int) -> torch.Tensor:
        """The blend pattern P, (C, H, W) in [0, 1]."""
        key = ("pattern", C, H, W)
        if key not in self._cache:
            if self.params["image"] is not None:
                self._cache[key] = _load_image(self.params["image"], C, (H, W))[0]
            else:
                self._cache[key] = _seeded_uniform(self.seed, (C, H, W))
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        alpha = self.params["alpha"]
        P = self.pattern(C, H, W).to(x.device, x.dtype)
        return (1 - alpha) * x + alpha * P


class SIG(Attack):
    """SIG (ALGORITHMS.md section 6): x' = clip(x + delta·sin(2π·j·f / W), 0, 1), j the column index.

    The same horizontal sinusoid on every row and channel. Defaults delta = 40/255, f = 6 (BackdoorBench).
    SIG is a clean-label attack: at training time only target-class samples are poisoned.
    """

    name = "sig"
    defaults: ClassVar[dict[str, Any]] = {"delta": 40 / 255, "frequency": 6.0}

    def _validate(self) -> None:
        self.params["delta"] = _number(self.name, "delta", self.params["delta"], 0.0, 1.0)
        self.params["frequency"] = _number(self.name, "frequency", self.params["frequency"], 0.0)

    def signal(self, W: int) -> torch.Tensor:
        """delta·sin(2π·j·f/W) for j = 0..W−1, shape (W,), computed in float64 then rounded once."""
        j = torch.arange(W, dtype=torch.float64)
        s = self.params["delta"] * torch.sin(2 * math.pi * j * self.params["frequency"] / W)
        return s.to(torch.float32)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        s = self.signal(x.shape[-1]).to(x.device, x.dtype)
        return (x + s).clamp_(0.0, 1.0)


class WaNet(Attack):
    """WaNet (ALGORITHMS.md section 6): warp every image with one fixed smooth displacement field.

    grid = clamp((identity + s·U/H)·grid_rescale, −1, 1), U = bicubic upsampling (align_corners=True) to H×W of
    a 2×k×k field uniform in [−1, 1] divided by its mean absolute value; x' = grid_sample(x, grid, bilinear,
    zero padding, align_corners=True). As in BackdoorBench, channel 0 of the field moves along the width,
    channel 1 along the height. The field is drawn from ``seed``, or read from ``grid``, a ``.npy`` file holding
    either the normalised field (2, k, k) / (1, 2, k, k) (see :meth:`save_field`) or BackdoorBench's upsampled
    ``noise_grid`` (H, W, 2) / (1, H, W, 2). Defaults k = 4, s = 0.5, grid_rescale = 1 (BackdoorBench).
    """

    name = "wanet"
    defaults: ClassVar[dict[str, Any]] = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "grid": None}
    path_params = ("grid",)

    def _validate(self) -> None:
        p = self.params
        p["k"] = _integer(self.name, "k", p["k"], lo=2)
        p["s"] = _number(self.name, "s", p["s"])
        p["grid_rescale"] = _number(self.name, "grid_rescale", p["grid_rescale"])
        p["grid"] = _path(self.name, "grid", p["grid"])
        self._field: torch.Tensor | None = None
        self._noise_grid: torch.Tensor | None = None
        if p["grid"] is not None:
            try:
                arr = np.load(p["grid"], allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise _bad(self.name, f"cannot read params.grid {p['grid']}: {exc}") from exc
            if arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
                raise _bad(self.name, f"params.grid must hold a finite float array, got {arr.dtype} {arr.shape}")
            if arr.shape[0] == 2 and arr.shape[1] == arr.shape[2]:
                self._field = torch.from_numpy(arr.astype(np.float32))[None]
                p["k"] = int(arr.shape[1])
            elif arr.shape[2] == 2:
                self._noise_grid = torch.from_numpy(arr.astype(np.float32))[None]
            else:
                raise _bad(self.name, f"params.grid must be (2, k, k) or (H, W, 2), got shape {arr.shape}")

    def field(self) -> torch.Tensor:
        """The normalised (1, 2, k, k) random field."""
        if self._noise_grid is not None:
            raise _bad(self.name, "params.grid holds an upsampled noise grid, not a k×k field")
        if self._field is None:
            k = self.params["k"]
            ins = _seeded_uniform(self.seed, (1, 2, k, k)) * 2 - 1
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
            if self._noise_grid is not None:
                noise = self._noise_grid
                if noise.shape[1:3] != (H, W):
                    raise _bad(
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


class BPP(Attack):
    """BPP (ALGORITHMS.md section 6): colour quantisation, x' = round(x·(levels−1))/(levels−1); default 8 levels.

    ``round`` is torch's round-half-to-even. For 8-bit images (x = v/255) no tie can occur: v·(levels−1)/255
    is never an odd multiple of 1/2, because 2·v·(levels−1) is even and 255·(2m+1) is odd.
    """

    name = "bpp"
    defaults: ClassVar[dict[str, Any]] = {"levels": 8}

    def _validate(self) -> None:
        self.params["levels"] = _integer(self.name, "levels", self.params["levels"], lo=2)

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        q = self.params["levels"] - 1
        return torch.round(x * q) / q


class Patch(Attack):
    """A custom (trojan-style) patch (ALGORITHMS.md section 6): x' = (1 − m)·x + m·P inside the patch area.

    P is ``image`` (any image file) or, without one, a uniform-random colour patch drawn from ``seed``;
    ``size`` = [h, w] resizes it (default: the image's own size, 5×5 for the random patch). The mask m is
    ``mask`` (a grey-level image, 255 = trigger), else the image's alpha channel, else all ones; it is scaled by
    ``opacity``. ``position`` is a corner name or [row, col] of the top-left pixel (negative: from the end).
    """

    name = "patch"
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
        p["image"] = _path(self.name, "image", p["image"])
        p["mask"] = _path(self.name, "mask", p["mask"])
        size = p["size"]
        if size is not None:
            if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
                size = [int(size), int(size)]
            if not (isinstance(size, (list, tuple)) and len(size) == 2):
                raise _bad(self.name, f"params.size must be [h, w], an integer or null, got {size!r}")
            size = [_integer(self.name, "size", v, lo=1) for v in size]
        elif p["image"] is None:
            size = [5, 5]
        p["size"] = size
        p["position"] = _position(self.name, p["position"])
        p["opacity"] = _number(self.name, "opacity", p["opacity"], 0.0, 1.0)

    def pattern(self, C: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch P (C, h, w) and its mask m (1, h, w), both in [0, 1]."""
        key = ("pattern", C)
        if key not in self._cache:
            p = self.params
            size = tuple(p["size"]) if p["size"] is not None else None
            if p["image"] is not None:
                patch, mask = _load_image(p["image"], C, size)
            else:
                assert size is not None
                patch = _seeded_uniform(self.seed, (C, *size))
                mask = torch.ones((1, *size))
            if p["mask"] is not None:
                mask = _load_mask(p["mask"], tuple(patch.shape[-2:]))
            self._cache[key] = (patch, mask * p["opacity"])
        return self._cache[key]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        _, C, H, W = x.shape
        patch, mask = self.pattern(C)
        ph, pw = patch.shape[-2:]
        r, c = _place(self.name, self.params["position"], ph, pw, H, W)
        out = x.clone()
        m = mask.to(x.device, x.dtype)
        region = out[:, :, r : r + ph, c : c + pw]
        out[:, :, r : r + ph, c : c + pw] = (1 - m) * region + m * patch.to(x.device, x.dtype)
        return out


ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (NoAttack, BadNets, Blended, SIG, WaNet, BPP, Patch)}


def build_attack(name: str, params: Mapping[str, Any] | None = None, seed: int = 0) -> Attack:
    """The attack called ``name`` with ``params`` (missing ones take their defaults) and ``seed``."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise OnnxclpError(f"unknown attack {name!r} (expected one of {', '.join(ATTACKS)})") from None
    return cls(params, seed=seed)


# --------------------------------------------------------------------------------------------------------------
# configuration files


@dataclass
class AttackConfig:
    """The content of an attack configuration file (schema in the module docstring)."""

    attack: str
    target: int = 0
    mode: str = "a2o"
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    normalize: dict[str, list[float]] | None = None

    def build(self) -> Attack:
        return build_attack(self.attack, self.params, self.seed)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "attack": self.attack,
            "target": self.target,
            "mode": self.mode,
            "seed": self.seed,
            "params": dict(self.params),
        }
        if self.normalize is not None:
            d["normalize"] = {"mean": list(self.normalize["mean"]), "std": list(self.normalize["std"])}
        return d

    @classmethod
    def from_attack(
        cls,
        attack: Attack,
        target: int = 0,
        mode: str = "a2o",
        normalize: Mapping[str, Any] | None = None,
    ) -> AttackConfig:
        norm = None if normalize is None else {"mean": list(normalize["mean"]), "std": list(normalize["std"])}
        return cls(attack.name, int(target), mode, attack.seed, attack.config(), norm)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | os.PathLike[str] | None = None) -> AttackConfig:
        """Validate a parsed configuration; relative file paths in ``params`` are taken from ``base_dir``."""
        if not isinstance(d, Mapping):
            raise OnnxclpError("attack config: expected a JSON object")
        unknown = sorted(set(d) - {"attack", "target", "mode", "seed", "params", "normalize"})
        if unknown:
            raise OnnxclpError(f"attack config: unknown key(s) {', '.join(unknown)}")
        name = d.get("attack")
        if name not in ATTACKS:
            raise OnnxclpError(f"attack config: 'attack' must be one of {', '.join(ATTACKS)}, got {name!r}")
        target = d.get("target", 0)
        if isinstance(target, bool) or not isinstance(target, int) or target < 0:
            raise OnnxclpError(f"attack config: 'target' must be a class index, got {target!r}")
        mode = d.get("mode", "a2o")
        if mode not in MODES:
            raise OnnxclpError(f"attack config: 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
        seed = d.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise OnnxclpError(f"attack config: 'seed' must be an integer, got {seed!r}")
        params = d.get("params", {}) or {}
        if not isinstance(params, Mapping):
            raise OnnxclpError("attack config: 'params' must be an object")
        params = dict(params)
        if base_dir is not None:
            for key in ATTACKS[name].path_params:
                value = params.get(key)
                if isinstance(value, str) and not Path(value).is_absolute():
                    params[key] = str(Path(base_dir) / value)
        normalize = d.get("normalize")
        if normalize is not None:
            normalize = _check_normalize(normalize)
        return cls(name, target, mode, seed, params, normalize)


def _check_normalize(normalize: Any) -> dict[str, list[float]]:
    ok = isinstance(normalize, Mapping) and set(normalize) == {"mean", "std"}
    if ok:
        mean, std = normalize["mean"], normalize["std"]
        ok = (
            isinstance(mean, list)
            and isinstance(std, list)
            and len(mean) == len(std) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mean + std)
            and all(v > 0 for v in std)
        )
    if not ok:
        raise OnnxclpError('attack config: \'normalize\' must be {"mean": [...], "std": [...]} with std > 0')
    return {"mean": [float(v) for v in normalize["mean"]], "std": [float(v) for v in normalize["std"]]}


def load_attack_config(path: str | os.PathLike[str]) -> AttackConfig:
    """Read an attack configuration JSON file; file paths inside are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OnnxclpError(f"cannot read attack config {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OnnxclpError(f"attack config {path} is not valid JSON: {exc}") from exc
    return AttackConfig.from_dict(data, base_dir=path.parent)


def save_attack_config(
    path: str | os.PathLike[str],
    attack: Attack,
    target: int = 0,
    mode: str = "a2o",
    normalize: Mapping[str, Any] | None = None,
) -> AttackConfig:
    """Write ``attack``'s full configuration as JSON; file paths inside ``path``'s folder are made relative."""
    path = Path(path)
    config = AttackConfig.from_attack(attack, target, mode, normalize)
    base = path.parent.resolve()
    for key in attack.path_params:
        value = config.params.get(key)
        if isinstance(value, str):
            resolved = Path(value).resolve()
            if resolved.is_relative_to(base):
                config.params[key] = resolved.relative_to(base).as_posix()
    path.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    return config
