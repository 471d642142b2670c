"""The method registry: one module per defence in this package, found and registered on first use.

``get(name)`` returns a method instance; ``names()`` lists them; :func:`make_params` resolves a method's
parameters from its defaults and checks them. Adding a method is adding one module here that defines a
:class:`~onnxclp.methods.base.Method` subclass decorated with :func:`register` (plus its tests and its section
in docs/algorithms.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onnxclp.errors import OnnxclpError
from onnxclp.methods.base import NEEDS, Method, Params, ParamSpec
from onnxclp.registry import Registry

__all__ = ["NEEDS", "Method", "ParamSpec", "Params", "describe", "get", "make_params", "names", "register"]

_REGISTRY: Registry[Method] = Registry("method", __name__, __path__, skip=("base",))


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry (its ``name`` must be new, its ``needs`` one of NEEDS)."""
    if cls.needs not in NEEDS:
        raise ValueError(f"method {cls.name!r}: needs {cls.needs!r} is not one of {NEEDS}")
    return _REGISTRY.register(cls)


names = _REGISTRY.names


def get(name: str) -> Method:
    """The registered method ``name``; an unknown name is a usage error listing the choices."""
    return _REGISTRY.get(name)


def all_params() -> dict[str, ParamSpec]:
    """Every parameter any method declares, by name (the CLI builds one option per name)."""
    out: dict[str, ParamSpec] = {}
    for n in names():
        for p in _REGISTRY.classes()[n].params:
            out.setdefault(p.name, p)
    return out


def describe() -> list[dict[str, Any]]:
    """One JSON-ready object per method: name, needs, description, paper, defaults, parameters."""
    out = []
    for n in names():
        cls = _REGISTRY.classes()[n]
        out.append(
            {
                "name": n,
                "needs": cls.needs,
                "extra": cls.extra,
                "description": cls.description,
                "paper": cls.paper,
                "defaults": cls.defaults(),
                "rescales": cls.rescales,
                "experimental": cls.experimental,
                "parameters": [
                    {"name": p.name, "flag": p.flag, "type": p.type.__name__, "default": p.default, "help": p.help}
                    for p in cls.params
                ],
            }
        )
    return out


def make_params(
    method: str = "clp",
    values: Mapping[str, Any] | None = None,
    *,
    score: str | None = None,
    include_fc: bool | None = None,
) -> Params:
    """Fill unset (None) parameters with ``method``'s defaults and check them.

    A value for a parameter the method does not declare is a usage error naming the methods that take it.
    """
    from onnxclp import scoring

    m = get(method)
    given = {k: v for k, v in (values or {}).items() if v is not None}
    foreign = [k for k in given if m.spec(k) is None]
    if foreign:
        owners = sorted({n for n in names() for p in _REGISTRY.classes()[n].params if p.name in foreign})
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        where = f"--method {' / '.join(owners)} only" if owners else "no method"
        raise OnnxclpError(f"{flags} {'applies' if len(foreign) == 1 else 'apply'} to {where}")
    resolved = {}
    for p in m.params:
        v = given.get(p.name, p.default)
        try:
            resolved[p.name] = p.type(v)
        except (TypeError, ValueError) as exc:
            raise OnnxclpError(f"{p.flag}: {v!r} is not a {p.type.__name__}") from exc
    m.check(resolved)
    chosen_score = m.score if score is None else score
    if chosen_score is not None:
        scoring.get(chosen_score)  # unknown score: usage error
    return Params(
        method=m.name,
        score=chosen_score or "",
        include_fc=bool(m.include_fc if include_fc is None else include_fc),
        values=resolved,
        given=frozenset(given),
    )
