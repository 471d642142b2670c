"""onnxclp: data-free backdoor removal (CLP, LPP) for any ONNX model.

``sanitize`` and ``scan`` need only onnx and numpy. ``evaluate`` and ``compare`` (onnxruntime, torch) are
imported on first use, so ``import onnxclp`` stays fast.
"""

from __future__ import annotations

from onnxclp._version import __version__
from onnxclp.api import sanitize, sanitize_file, scan
from onnxclp.errors import NothingToSanitize, OnnxclpError
from onnxclp.report import Report

__all__ = [
    "NothingToSanitize",
    "OnnxclpError",
    "Report",
    "__version__",
    "compare",
    "evaluate",
    "sanitize",
    "sanitize_file",
    "scan",
]


def __getattr__(name: str):
    if name in ("evaluate", "compare"):
        from onnxclp.eval import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxclp' has no attribute {name!r}")
