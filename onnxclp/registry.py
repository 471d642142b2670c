"""One registry type for the pluggable parts: methods (:mod:`onnxclp.methods`), scores (:mod:`onnxclp.scoring`)
and detectors (:mod:`onnxclp.detect`). Each is a package whose modules define classes decorated with the
registry's :meth:`Registry.register`; the modules are imported (discovered with pkgutil) on first use."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from onnxclp.errors import OnnxclpError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by their ``name`` attribute; ``kind`` names them in errors ("method", "score", "detector")."""

    def __init__(self, kind: str, package: str, path: Iterable[str], skip: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._package = package
        self._path = list(path)
        self._skip = skip
        self._classes: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: add ``cls`` under ``cls.name`` (a second class with that name is an error)."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._classes[name] = cls
        return cls

    def classes(self) -> dict[str, type[T]]:
        """Every registered class by name, its package's modules imported first."""
        if not self._loaded:
            for info in sorted(pkgutil.iter_modules(self._path), key=lambda m: m.name):
                if not info.name.startswith("_") and info.name not in self._skip:
                    importlib.import_module(f"{self._package}.{info.name}")
            self._loaded = True
        return self._classes

    def names(self) -> list[str]:
        """Names ordered by the classes' ``order`` attribute (default 100), then alphabetically."""
        found = self.classes()
        return sorted(found, key=lambda n: (getattr(found[n], "order", 100), n))

    def get(self, name: str, *args: Any) -> T:
        """An instance of the class ``name``; an unknown name is a usage error listing the choices."""
        cls = self.classes().get(name)
        if cls is None:
            raise OnnxclpError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}")
        return cls(*args)
