"""The Python API: :func:`sanitize`, :func:`scan` and :func:`sanitize_file` (the CLI is a thin shell over these).

Each call resolves the method's parameters from the registry (:mod:`onnxclp.methods`), loads the model safely and
runs the pass pipeline (:mod:`onnxclp.pipeline`). Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxclp import methods
from onnxclp.errors import NothingToSanitize, OnnxclpError
from onnxclp.io import checked_store, load_model, save_model
from onnxclp.methods import Params, make_params
from onnxclp.pipeline import Options, Pass, State, run
from onnxclp.report import Report

__all__ = ["Options", "Params", "make_params", "passes", "run_method", "sanitize", "sanitize_file", "scan"]


def passes() -> tuple[Pass, ...]:
    """The sanitize/scan pipeline, in order: inline, fuse_bn, find, exclude, score, guard.split, tune, decide,
    streams, prune, rewrite, guard.check, report, annotate. The passes are imported on first use (``import
    onnxclp`` stays light); they import :mod:`onnxclp.pipeline`, never this module."""
    from onnxclp.passes import (
        annotate,
        decide,
        exclude,
        find,
        fuse_bn,
        guard,
        inline,
        prune,
        report,
        rewrite,
        score,
        streams,
        tune,
    )

    return (
        inline.run,
        fuse_bn.run,
        find.run,
        exclude.run,
        score.run,
        guard.split,
        tune.run,
        decide.run,
        streams.run,
        prune.run,
        rewrite.run,
        guard.check,
        report.run,
        annotate.run,
    )


def _state(model_or_path: onnx.ModelProto | str | os.PathLike[str], params: Params, options: Options,
           base_dir: str | None) -> State:  # fmt: skip
    if isinstance(model_or_path, onnx.ModelProto):  # the checks of a file (load_model), on a copy
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        store, path = checked_store(model, Path(base_dir or ".")), None
    else:
        model, store = load_model(model_or_path)
        path = str(model_or_path)
    return State(model, store, methods.get(params.method), params, options, path)


def _recorded_normalization(state: State) -> str | None:
    """Real clean images given without ``mean``/``std``: the normalisation the model records in its metadata, or
    pixels 0..255 for an 8-bit input (:func:`onnxclp.eval.normalize.input_normalization`), as ``evaluate`` and
    ``scan`` read it, goes into the context, so the repair trains and the guard measures on the images the model
    was trained on; returns the report's note (None when nothing was read). Before, sanitize fed such a model raw
    [0, 1] pixels while evaluate normalised them."""
    ctx = state.options.context
    data = ctx.get("clean_data") if ctx.get("clean_arrays") is None else ctx["clean_arrays"][2]
    if data is None or str(data).strip().lower().startswith("synthetic"):
        return None
    if ctx.get("mean") is not None or ctx.get("std") is not None or not isinstance(ctx, dict):
        return None
    from onnxclp.eval.normalize import EIGHT_BIT, input_normalization

    found = input_normalization(state.model)
    if found is None:
        return None
    mean, std, key = found
    ctx["mean"], ctx["std"] = list(mean), list(std)
    where = "the model's input is 8-bit (pixels 0..255)" if key == EIGHT_BIT else f"the model's metadata ({key})"
    return (
        f"normalisation of the clean images: mean {','.join(f'{v:g}' for v in mean)} std "
        f"{','.join(f'{v:g}' for v in std)}, from {where}; --mean/--std override it"
    )


def _check_risk(params: Params, options: Options) -> list[str]:
    """Risky parameter values (below a parameter's ``risky_below``) need ``force``; returns the report notes."""
    risky = methods.get(params.method).risky(params.values)
    if not risky:
        return []
    what = ", ".join(risky)
    if not options.force:
        raise OnnxclpError(
            f"{what} prunes far more than the paper's settings (most channels of a layer can go): "
            "pass --force to run it anyway"
        )
    return [f"WARNING: {what} was forced: expect a large share of channels pruned"]


def run_method(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    params: Params,
    options: Options | None = None,
    base_dir: str | None = None,
    *,
    allow_empty: bool = False,
) -> State:
    """Load ``model_or_path`` and run the pipeline with ``params`` and ``options``; returns the final state
    (``state.model`` is the edited model when ``options.edit``, ``state.report`` the report). A model with no
    layer to score raises :class:`NothingToSanitize` unless ``allow_empty`` (``scan``: its detectors may still
    read it, or say why they cannot)."""
    options = options or Options()
    from onnxclp.passes.streams import STREAM_RULES

    if options.streams not in STREAM_RULES:
        raise OnnxclpError(f"--streams must be one of {', '.join(STREAM_RULES)}, got {options.streams!r}")
    notes = _check_risk(params, options)
    experimental = methods.get(params.method).experimental
    if experimental and options.edit:
        notes.append(f"WARNING: {experimental}")
    state = _state(model_or_path, params, options, base_dir)
    state.notes.extend(notes)
    recorded = _recorded_normalization(state)
    if recorded is not None:
        state.notes.append(recorded)
    report = run(state, passes())
    if not report.layers and not state.rewrites and not state.added_nodes and not allow_empty:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in report.skipped[:3])
        raise NothingToSanitize(
            "no layer can be scored (no Conv/ConvTranspose/Gemm/MatMul with a constant weight"
            + (f"; skipped: {reasons}" if reasons else "")
            + ")"
        )
    return state


def _params(method: str, values: Mapping[str, Any], score: str | None, include_fc: bool | None) -> Params:
    return make_params(method, values, score=score, include_fc=include_fc)


def sanitize(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    method: str = "clp",
    u: float | None = None,
    *,
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Sequence[str] = (),
    fuse_bn: bool = False,
    base_dir: str | None = None,
    inline_functions: bool = False,
    force: bool = False,
    context: Mapping[str, Any] | None = None,
    streams: str = "strongest",
    drop_initializer_inputs: bool = False,
    **method_params: Any,
) -> tuple[onnx.ModelProto, Report]:
    """Sanitize a model with a registered method (``onnxclp methods`` lists them; CLP: Zheng et al., ECCV 2022,
    section 4.5, Algorithm 1; LPP: docs/algorithms.md, "LPP").

    ``model_or_path`` is a ModelProto (not modified: a copy is edited; ``base_dir`` locates its external data)
    or a path (loaded safely); both go through the same model checks (:func:`onnxclp.io.checked_store`). ``method_params`` are the method's own parameters (``u_low``, ``bias_rate``,
    ``topk`` for LPP...); unset ones take the method's defaults. ``streams``: the residual-stream rule
    (:mod:`onnxclp.passes.streams`: ``strongest`` prunes a stream channel in one layer only, ``all`` keeps
    every layer's decision). ``context`` carries what a data-reading
    method needs (``clean_data``...). Returns the sanitized model and the report. Raises
    :class:`~onnxclp.errors.OnnxclpError` on bad input and :class:`~onnxclp.errors.NothingToSanitize` when no
    layer can be scored. ``inline_functions`` inlines model-local functions first (:mod:`onnxclp.passes.inline`).
    ``drop_initializer_inputs`` also removes every initializer from the graph inputs (IR version 4 or later; an
    IR version 3 model is refused: it requires them; :mod:`onnxclp.passes.annotate`).
    """
    params = _params(method, {"u": u, **method_params}, score, include_fc)
    options = Options(
        tuple(exclude),
        fuse_bn,
        inline_functions,
        True,
        force,
        dict(context or {}),
        streams,
        drop_initializer_inputs=drop_initializer_inputs,
    )
    state = run_method(model_or_path, params, options, base_dir)
    assert state.report is not None
    return state.model, state.report


def scan(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    method: str = "clp",
    u: float | None = None,
    *,
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Sequence[str] = (),
    base_dir: str | None = None,
    inline_functions: bool = False,
    force: bool = False,
    context: Mapping[str, Any] | None = None,
    streams: str = "strongest",
    **method_params: Any,
) -> Report:
    """The analysis of :func:`sanitize` (scores, thresholds, flagged channels) without editing anything."""
    params = _params(method, {"u": u, **method_params}, score, include_fc)
    options = Options(tuple(exclude), False, inline_functions, False, force, dict(context or {}), streams)
    state = run_method(model_or_path, params, options, base_dir)
    assert state.report is not None
    return state.report


def check_output(src: str | os.PathLike[str], dst: str | os.PathLike[str], force: bool = False) -> None:
    """Refuse an output path before any work: the input itself (unless ``force``), a folder, a missing folder."""
    s, d = Path(src), Path(dst)
    if d.exists() and s.exists() and os.path.samefile(s, d) and not force:
        raise OnnxclpError(f"{d}: output is the input file; use --force to overwrite it")
    if d.is_dir():
        raise OnnxclpError(f"{d}: is a directory")
    parent = d.parent if str(d.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxclpError(f"{d}: folder {parent} does not exist")


def sanitize_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    method: str = "clp",
    u: float | None = None,
    *,
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Sequence[str] = (),
    fuse_bn: bool = False,
    force: bool = False,
    allow_risky: bool | None = None,
    inline_functions: bool = False,
    context: Mapping[str, Any] | None = None,
    streams: str = "strongest",
    drop_initializer_inputs: bool = False,
    **method_params: Any,
) -> Report:
    """Sanitize ``src`` and write the result to ``dst`` atomically (``src`` is never modified).

    Refuses ``dst`` == ``src`` unless ``force``; ``allow_risky`` (default: ``force``) admits parameter values far
    outside the paper's. The other arguments are those of :func:`sanitize`.
    """
    start = time.perf_counter()
    check_output(src, dst, force)
    params = _params(method, {"u": u, **method_params}, score, include_fc)
    risky = force if allow_risky is None else allow_risky
    options = Options(
        tuple(exclude),
        fuse_bn,
        inline_functions,
        True,
        risky,
        dict(context or {}),
        streams,
        drop_initializer_inputs=drop_initializer_inputs,
    )
    state = run_method(Path(src), params, options)
    report = state.report
    assert report is not None
    report.output = str(dst)
    report.written = save_model(state.model, state.store, Path(dst))
    report.time_s = time.perf_counter() - start
    return report
