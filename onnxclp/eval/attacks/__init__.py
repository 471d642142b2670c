"""Backdoor triggers in torch, for evaluation and for training the model zoo: a registry of attacks.

One module per attack in this package (``badnets``, ``blended``, ``sig``, ``wanet``, ``bpp``, ``patch``, and
``none``, the identity), each defining an :class:`Attack` subclass decorated with :func:`register`; the modules
are found with :mod:`pkgutil` and loaded when this package is imported, so :data:`ATTACKS` lists them all.
Adding an attack is adding one module here (plus its tests and its row in docs/evaluate.md); the CLI's
``--attack`` choices come from the registry. :mod:`~onnxclp.eval.attacks.base` holds what they share: the base
class, the label rules, the parameter checks and the attack configuration file.
"""

from __future__ import annotations

import importlib
import pkgutil

from onnxclp.eval.attacks.base import (
    ATTACKS,
    CORNERS,
    MODES,
    Attack,
    AttackConfig,
    attacked_mask,
    build_attack,
    load_attack_config,
    register,
    save_attack_config,
    target_labels,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from onnxclp.eval.attacks.badnets import BadNets  # noqa: E402  (after discovery: the registry is complete)
from onnxclp.eval.attacks.blended import Blended  # noqa: E402
from onnxclp.eval.attacks.bpp import BPP  # noqa: E402
from onnxclp.eval.attacks.none import NoAttack  # noqa: E402
from onnxclp.eval.attacks.patch import Patch  # noqa: E402
from onnxclp.eval.attacks.sig import SIG  # noqa: E402
from onnxclp.eval.attacks.wanet import WaNet  # noqa: E402


def names() -> list[str]:
    """Registered attack names, in display order (``none`` first)."""
    return list(ATTACKS)


__all__ = [
    "ATTACKS",
    "BPP",
    "CORNERS",
    "MODES",
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
    "names",
    "register",
    "save_attack_config",
    "target_labels",
]
