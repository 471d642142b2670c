"""Numerical cores of the data-free defences that run the model on synthetic inputs (through onnxclp.bridge).

- :func:`mmbd` (:mod:`onnxclp.defences.mmbd`): MM-BD's maximum-margin detection (Wang et al., IEEE S&P 2024).
- :func:`otbr_channel_scores` and :func:`ot_fuse` (:mod:`onnxclp.defences.otbr`): OTBR's random-unlearning
  neuron weight changes and optimal-transport fusion (Lin et al., AAAI 2025).

Pure functions: they never modify the module they are given and never write ONNX; the method modules of the
registry turn their results into edits. Needs the ``torch`` and ``scipy`` packages.
"""

from __future__ import annotations

from onnxclp.defences._inputs import SyntheticInput
from onnxclp.defences.mmbd import MMBDResult, gamma_null_pvalue, mmbd
from onnxclp.defences.otbr import (
    FusedLayer,
    NWCResult,
    ScoredLayer,
    fuse_layer,
    ot_fuse,
    otbr_channel_scores,
    select_top,
)

__all__ = [
    "FusedLayer",
    "MMBDResult",
    "NWCResult",
    "ScoredLayer",
    "SyntheticInput",
    "fuse_layer",
    "gamma_null_pvalue",
    "mmbd",
    "ot_fuse",
    "otbr_channel_scores",
    "select_top",
]
