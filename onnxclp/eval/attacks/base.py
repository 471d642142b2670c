"""What every attack shares: the :class:`Attack` base class and its registry, the label rules, the parameter
checks and image loaders the triggers use, and the attack configuration file.

Every trigger works on a batch ``x`` of shape (N, C, H, W), float, in [0, 1], *before* normalisation, and is
vectorised over the batch. Every trigger is a pure function of its parameters and one integer seed: the same
configuration gives the same pixels on every machine, so the trigger a model was poisoned with can be
reproduced exactly at evaluation time.

The attack configuration file (written by the model-zoo trainer, read by ``onnxclp evaluate --attack-config``)::

    {"attack": "badnets", "target": 0, "mode": "a2o", "seed": 0,
     "params": {... every parameter of the attack, defaults filled in ...},
     "normalize": {"mean": [...], "std": [...]}}          # optional

Label rules (docs/algorithms.md, "Metrics"): all-to-one (``a2o``) sends every triggered sample to ``target`` and only
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
from onnxclp.eval.metrics import MODES, attacked_mask, target_labels

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackConfig",
    "attacked_mask",
    "build_attack",
    "load_attack_config",
    "register",
    "save_attack_config",
    "target_labels",
]

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")

# The registry: attack name -> class, in display order (filled by :func:`register` as the modules load).
ATTACKS: dict[str, type[Attack]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add an attack to :data:`ATTACKS` (its ``name`` must be new), kept in ``order``."""
    if cls.name in ATTACKS and ATTACKS[cls.name] is not cls:
        raise ValueError(f"attack {cls.name!r} registered twice")
    ATTACKS[cls.name] = cls
    ordered = sorted(ATTACKS.values(), key=lambda c: (c.order, c.name))
    ATTACKS.clear()
    ATTACKS.update((c.name, c) for c in ordered)
    return cls


# --------------------------------------------------------------------------------------------------------------
# parameter helpers


def bad(attack: str, message: str) -> OnnxclpError:
    return OnnxclpError(f"{attack}: {message}")


def number(attack: str, key: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(attack, f"params.{key} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad(attack, f"params.{key} must be in [{lo}, {hi}], got {value!r}")
    return float(value)


def integer(attack: str, key: str, value: Any, lo: int | None = None) -> int:
    integral = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise bad(attack, f"params.{key} must be an integer, got {value!r}")
    value = int(value)
    if lo is not None and value < lo:
        raise bad(attack, f"params.{key} must be at least {lo}, got {value}")
    return value


def file_path(attack: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise bad(attack, f"params.{key} must be a file path or null, got {value!r}")
    path = Path(value)
    if not path.is_file():
        raise bad(attack, f"params.{key}: no such file: {path}")
    return str(value)


def position_param(attack: str, value: Any) -> str | list[int]:
    """A corner name or [row, col] of the patch's top-left pixel (negative: counted from the bottom/right)."""
    if isinstance(value, str):
        if value not in CORNERS:
            raise bad(attack, f"params.position must be one of {', '.join(CORNERS)} or [row, col], got {value!r}")
        return value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        return [int(value[0]), int(value[1])]
    raise bad(attack, f"params.position must be a corner name or [row, col], got {value!r}")


def place(attack: str, position: str | list[int], ph: int, pw: int, H: int, W: int) -> tuple[int, int]:
    """Top-left pixel of a ph×pw patch in an H×W image; the patch must fit entirely."""
    if isinstance(position, str):
        row = H - ph if position.startswith("bottom") else 0
        col = W - pw if position.endswith("right") else 0
    else:
        row, col = position
        row = row + H if row < 0 else row
        col = col + W if col < 0 else col
    if ph > H or pw > W or row < 0 or col < 0 or row + ph > H or col + pw > W:
        raise bad(attack, f"a {ph}×{pw} patch at {position} does not fit in a {H}×{W} image")
    return row, col


def _read_npy(path: str, what: str) -> np.ndarray:
    """A ``.npy`` image as float32 (C, h, w) in [0, 1]: (h, w), (h, w, C) or (C, h, w); uint8 is divided by 255."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise OnnxclpError(f"cannot read {what} {path}: {exc}") from exc
    counts = (1, 3, 4)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in counts:
        arr = arr.transpose(2, 0, 1)  # (h, w, C); when both readings fit, HWC as numpy and Pillow write it
    if arr.ndim != 3 or arr.shape[0] not in (1, 3, 4) or arr.size == 0:
        raise OnnxclpError(f"{what} {path}: expected an image array (h, w), (h, w, C) or (C, h, w), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise OnnxclpError(f"{what} {path}: expected uint8 or float values in [0, 1] ({arr.dtype})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _resize(t: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t[None], size=size, mode=mode, **kwargs)[0].clamp_(0, 1)


def load_image(path: str, channels: int, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an image file, or a ``.npy`` array, as (C, h, w) float in [0, 1] plus its alpha (1, h, w) (ones when
    it has none; a 4-channel array's last channel is its alpha).

    ``size`` = (h, w) resizes it (bilinear for the colours, nearest for the alpha).
    """
    if str(path).lower().endswith(".npy"):
        arr = _read_npy(path, "trigger image")
        alpha_arr = arr[3:4] if arr.shape[0] == 4 and channels != 4 else None
        arr = arr[:3] if alpha_arr is not None else arr
        if arr.shape[0] != channels:
            if channels == 1:  # grey level as Pillow's "L" conversion computes it
                w = np.array([0.299, 0.587, 0.114], np.float32)[: arr.shape[0]]
                arr = (arr * (w / w.sum())[:, None, None]).sum(axis=0, keepdims=True)
            elif arr.shape[0] == 1:
                arr = np.repeat(arr, channels, axis=0)
            else:
                arr = np.repeat(arr.mean(axis=0, keepdims=True), channels, axis=0)
        colour = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        a = (
            torch.ones((1, *colour.shape[1:]))
            if alpha_arr is None
            else torch.from_numpy(np.ascontiguousarray(alpha_arr))
        )
        if size is not None:
            colour, a = _resize(colour, size, "bilinear"), _resize(a, size, "nearest")
        return colour, a
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


def load_mask(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A mask image (or ``.npy`` array) as (1, h, w) in [0, 1] (grey level / 255), resized to ``size`` with
    nearest neighbours."""
    if str(path).lower().endswith(".npy"):
        arr = _read_npy(path, "mask")
        return _resize(torch.from_numpy(arr.mean(axis=0, keepdims=True)), size, "nearest")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            grey = img.convert("L")
    except (OSError, UnidentifiedImageError) as exc:
        raise OnnxclpError(f"cannot read mask image {path}: {exc}") from exc
    if grey.size != (size[1], size[0]):
        grey = grey.resize((size[1], size[0]), Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(grey, dtype=np.float32)[None] / 255.0)


def seeded_uniform(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform [0, 1) numbers from torch's CPU generator: identical on every machine for a given seed."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.rand(shape, generator=gen, dtype=torch.float32)


def check_batch(name: str, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise bad(name, f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise bad(name, f"expected float images in [0, 1], got dtype {x.dtype}")


# --------------------------------------------------------------------------------------------------------------
# the base class


class Attack(ABC):
    """A trigger: ``apply`` maps clean images in [0, 1] to triggered ones, deterministically.

    Subclasses (one module each in this package, decorated with :func:`register`) declare ``name``, ``defaults`` (every parameter and its default, BackdoorBench's where it has
    one) and ``path_params`` (parameters holding file paths, resolved relative to a configuration file).
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    path_params: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 100  # position in listings (the registry's order)

    def __init__(self, params: Mapping[str, Any] | None = None, seed: int = 0) -> None:
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            allowed = ", ".join(self.defaults) or "none"
            raise bad(self.name, f"unknown parameter(s) {', '.join(unknown)} (allowed: {allowed})")
        self.seed = integer(self.name, "seed", seed)
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
        check_batch(self.name, x)
        if x.shape[0] == 0:
            return x.clone()
        return self._apply(x)

    __call__ = apply

    def config(self) -> dict[str, Any]:
        """Every parameter of this attack with defaults filled in (the ``params`` of the configuration file)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed}, params={self.config()})"


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
