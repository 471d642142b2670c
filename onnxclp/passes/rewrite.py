"""Write the values a repair method computed (``state.rewrites``) into the model's initializers, and apply a
method's graph addition (``state.graph_edit``: NPD's inserted layer).

Only the named initializers change, each in its own dtype, name, dims and doc string (an external one is saved
external again by :func:`onnxclp.io.save_model`); nothing else in the graph is touched.
"""

from __future__ import annotations

import numpy as np

from onnxclp.errors import OnnxclpError
from onnxclp.pipeline import PassResult, State


def relative_change(old: np.ndarray, new: np.ndarray) -> float | None:
    """``||new - old|| / ||old||``; None for an all-zero ``old`` (no scale to compare with)."""
    o = np.asarray(old, dtype=np.float64)
    n = np.asarray(new, dtype=np.float64)
    base = float(np.linalg.norm(o))
    diff = float(np.linalg.norm(n - o))
    if base == 0.0:
        return 0.0 if diff == 0.0 else None
    return diff / base


def write_rewrites(state: State) -> int:
    """Write ``state.rewrites`` into their initializers (each in its own dims); returns how many. Also used by a
    staged repair (sau-ac) whose second stage trains on the first stage's values."""
    assert state.index is not None
    for name, value in state.rewrites.items():
        tensor = state.index.initializers.get(name)
        if tensor is None:
            raise OnnxclpError(f"internal: a repair rewrote {name!r}, which is not an initializer", 4)
        state.store.write(tensor, np.reshape(np.asarray(value), tuple(tensor.dims)))
    return len(state.rewrites)


def run(state: State) -> PassResult:
    """Pipeline pass (only when editing)."""
    if not state.options.edit or (not state.rewrites and state.graph_edit is None):
        return PassResult()
    changed = write_rewrites(state)
    if state.graph_edit is not None:
        state.added_nodes = list(state.graph_edit(state))
        changed += len(state.added_nodes)
    return PassResult(changed)
