"""Behaviour pinned byte for byte: the sanitized files and reports recorded by tests/golden/make_golden.py.

Recorded before the registry/pipeline refactor; a change that alters a sanitized byte or a report field of these
models (two torch exporters, tf2onnx, QDQ; CLP and LPP; with and without --fuse-bn) fails here. A deliberate
change of behaviour re-records with ``python tests/golden/make_golden.py --record`` and says why in its commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402

EXPECTED = json.loads((GOLDEN / "expected.json").read_text())


@pytest.mark.parametrize("case", make_golden.CASES, ids=[make_golden.key(*c) for c in make_golden.CASES])
def test_golden(case):
    got = make_golden.run_case(*case)
    want = EXPECTED[make_golden.key(*case)]
    assert got["report"] == want["report"]
    assert got["sha256"] == want["sha256"]
