"""Evaluation of ONNX classifiers: clean accuracy, attack success rate and robust accuracy (docs/algorithms.md,
"Metrics" and "Attacks"; usage: docs/evaluate.md).

- :mod:`onnxclp.eval.options`: :class:`RunOptions` (how a model is run) and the one device rule (no torch).
- :mod:`onnxclp.eval.data`: local data sets (``.npz``, ImageFolder, CIFAR python batches).
- :mod:`onnxclp.eval.attacks`: the backdoor triggers in torch, a registry of one module per attack, shared with
  the model-zoo trainer.
- :mod:`onnxclp.eval.runner`: onnxruntime sessions, provider selection, batching.
- :mod:`onnxclp.eval.run`: :func:`prepare_run` and the batch loop evaluate and compare share.
- :mod:`onnxclp.eval.metrics`: :class:`Metrics` (ACC / ASR / RA and their counts) and the label rules.
- :mod:`onnxclp.eval.normalize`: the input normalisation a model records in its metadata (no torch).
- :mod:`onnxclp.eval.examples`: the ``--save-examples`` picture (clean, triggered, difference).
- :mod:`onnxclp.eval.api`: :func:`evaluate` and :func:`compare`.
- the ``evaluate`` and ``compare`` commands live in :mod:`onnxclp.cli.eval`.

Importing this package is cheap: torch and onnxruntime load only when ``evaluate``/``compare`` (or a
submodule that needs them) is first used.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CompareResult",
    "EvalResult",
    "Metrics",
    "Run",
    "RunOptions",
    "compare",
    "evaluate",
    "normalization_from_metadata",
    "prepare_run",
    "resolve_device",
]

_HOME = {
    "CompareResult": "api",
    "EvalResult": "api",
    "compare": "api",
    "evaluate": "api",
    "Metrics": "metrics",
    "normalization_from_metadata": "normalize",
    "Run": "run",
    "prepare_run": "run",
    "RunOptions": "options",
    "resolve_device": "options",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"onnxclp.eval.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
