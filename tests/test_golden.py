"""Behaviour pinned byte for byte: the sanitized files and reports recorded by tests/golden/make_golden.py.

Recorded before the registry/pipeline refactor; a change that alters a sanitized byte or a report field of these
models (two torch exporters, tf2onnx, QDQ; CLP and LPP; with and without --fuse-bn) fails here. A deliberate
change of behaviour re-records with ``python tests/golden/make_golden.py --record`` and says why in its commit.
The files are compared byte for byte; the reports' floating-point fields (CLP's spectral scores and their
statistics) to a relative 1e-9: numpy 2.4.6 computes the largest singular values one unit in the last place away
from the release they were recorded with, which changes no decision and no written byte.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


def differences(got: Any, want: Any, path: str = "report") -> list[str]:
    """Where ``got`` differs from ``want``: floats beyond a relative 1e-9, anything else at all."""
    if isinstance(got, float) and isinstance(want, float):
        return [] if math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0) else [f"{path}: {got!r} != {want!r}"]
    if isinstance(got, dict) and isinstance(want, dict):
        if got.keys() != want.keys():
            return [f"{path}: keys {sorted(set(got) ^ set(want))}"]
        return [d for k in want for d in differences(got[k], want[k], f"{path}.{k}")]
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{path}[{i}]")]
    return [] if got == want and type(got) is type(want) else [f"{path}: {got!r} != {want!r}"]


def test_differences_sees_what_matters():
    assert differences({"a": [1.0, "x"]}, {"a": [1.0 + 1e-15, "x"]}) == []
    assert differences({"a": [1.0]}, {"a": [1.001]}) and differences({"a": 1}, {"a": 2})
    assert differences({"a": 1}, {"b": 1}) and differences([1.0], [1.0, 2.0]) and differences(1, 1.0)


@pytest.mark.parametrize("case", make_golden.CASES, ids=[make_golden.key(*c) for c in make_golden.CASES])
def test_golden(case):
    got = make_golden.run_case(*case)
    want = EXPECTED[make_golden.key(*case)]
    assert differences(got["report"], want["report"]) == []
    assert got["sha256"] == want["sha256"]
