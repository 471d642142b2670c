"""The pass pipeline: one :class:`State` object, one :class:`PassResult` type, every pass ``run(state)``.

:func:`run` applies a sequence of passes (the sanitize/scan pipeline, in order, is :func:`onnxclp.api.passes`:
the passes import this module, so the list lives where the pipeline is assembled). A pass reads and writes only the
state; what it skips goes into ``state.skipped`` with a reason (one type: :class:`~onnxclp.report.SkippedLayer`).
Nothing here imports torch or onnxruntime: a method that runs the model imports its extra inside ``decide``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx

from onnxclp.report import CoupledChannels, Report, SkippedLayer
from onnxclp.tensors import TensorStore

if TYPE_CHECKING:
    from onnxclp.graph import GraphIndex
    from onnxclp.layers import Layer
    from onnxclp.methods import Method, Params
    from onnxclp.passes.decide import Decision
    from onnxclp.passes.score import ScoredLayer


@dataclass(frozen=True)
class Options:
    """How to run the pipeline (everything but the method's own parameters).

    ``context`` carries what methods that read data need (``clean_data``, ``input_shape``, ``mean``, ``std``,
    ``device``...); weight-only methods ignore it.
    """

    exclude: Sequence[str] = ()
    fuse_bn: bool = False
    inline_functions: bool = False
    edit: bool = True
    force: bool = False
    context: Mapping[str, Any] = field(default_factory=dict)
    streams: str = "strongest"  # residual-stream rule (onnxclp.passes.streams.STREAM_RULES)
    drop_initializer_inputs: bool = False  # remove initializers from graph.input (IR >= 4; onnxclp.passes.annotate)


@dataclass
class PassResult:
    """What one pass did: a count of things it changed or produced, and an optional note."""

    changed: int = 0
    note: str | None = None


@dataclass
class State:
    """Everything the passes share. ``path`` is the input file (None for an in-memory model)."""

    model: onnx.ModelProto
    store: TensorStore
    method: Method
    params: Params
    options: Options = field(default_factory=Options)
    path: str | None = None
    index: GraphIndex | None = None
    found: list[Layer] = field(default_factory=list)  # every scorable layer, before --exclude and the FC rule
    layers: list[Layer] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    scored: list[ScoredLayer] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    coupled: list[CoupledChannels] = field(default_factory=list)
    fused_batchnorms: int = 0
    inlined_functions: list[str] = field(default_factory=list)
    copied_tensors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: Report | None = None
    log: list[tuple[str, PassResult, float]] = field(default_factory=list)
    # methods given clean images (onnxclp.guard): the split, the guard's measurements, and what a repair did
    clean: Any = None  # onnxclp.passes.guard.CleanSplit
    probe: Any = None  # data-free methods that run the model: (images, the input's predictions), passes/guard.py
    guard: Any = None  # onnxclp.guard.GuardResult
    rewrites: dict[str, Any] = field(default_factory=dict)  # initializer name -> new value (file's dtype)
    graph_edit: Callable[[State], list[str]] | None = None  # adds nodes (NPD); returns their names
    added_nodes: list[str] = field(default_factory=list)
    training: dict[str, Any] | None = None  # a repair's curve and settings, for the report


Pass = Callable[[State], PassResult]


def run(state: State, pipeline: Sequence[Pass]) -> Report:
    """Apply every pass of ``pipeline`` to ``state`` in order (the sanitize/scan pipeline:
    :func:`onnxclp.api.passes`); returns the report the ``report`` pass assembled."""
    start = time.perf_counter()
    for p in pipeline:
        t = time.perf_counter()
        result = p(state)
        state.log.append((p.__module__.rsplit(".", 1)[-1], result, time.perf_counter() - t))
    assert state.report is not None, "the pipeline has no report pass"
    state.report.time_s = time.perf_counter() - start
    return state.report
