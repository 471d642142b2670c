"""Evaluation of ONNX classifiers: clean accuracy, attack success rate and robust accuracy
(docs/algorithms.md, "Metrics" and "Attacks").

- :mod:`onnxclp.eval.data`: local data sets (``.npz``, ImageFolder, CIFAR python batches).
- :mod:`onnxclp.eval.attacks`: the backdoor triggers in torch, shared with the model-zoo trainer.
- :mod:`onnxclp.eval.runner`: onnxruntime sessions, provider selection, batching.
- :mod:`onnxclp.eval.metrics`: ACC / ASR / RA counts.
- :mod:`onnxclp.eval.api`: :func:`evaluate` and :func:`compare`.
- the ``evaluate`` and ``compare`` commands live in :mod:`onnxclp.cli.eval`.

Importing this package is cheap: torch and onnxruntime load only when ``evaluate``/``compare`` (or a
submodule that needs them) is first used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CompareResult", "EvalResult", "compare", "evaluate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from onnxclp.eval import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
