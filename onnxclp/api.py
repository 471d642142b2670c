"""The Python API: :func:`sanitize` and :func:`scan` (the CLI is a thin shell over these).

The pipeline, one pass each: load safely -> (fuse BatchNorm) -> index the graph and find scored layers ->
score -> decide (CLP or LPP) -> edit -> annotate -> save atomically. Nothing here imports torch or
onnxruntime.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from onnxclp import __version__
from onnxclp.edit import Editor
from onnxclp.errors import NothingToSanitize, OnnxclpError
from onnxclp.graph import GraphIndex
from onnxclp.io import TensorStore, load_model, save_model
from onnxclp.layers import Skip, find_layers, find_nested
from onnxclp.passes.annotate import annotate
from onnxclp.passes.decide import Decision, Params, decide
from onnxclp.passes.fuse_bn import fuse_batchnorm
from onnxclp.passes.inline import inline_functions as _inline_functions
from onnxclp.passes.prune import apply_decisions
from onnxclp.passes.score import score_layers
from onnxclp.passes.streams import coupled_prunes, residual_streams
from onnxclp.report import CoupledChannels, LayerReport, Report, SkippedLayer

METHODS = ("clp", "lpp")
# Per-method defaults. CLP: the paper's CIFAR-10 setting. LPP: docs/lpp-defaults.md.
DEFAULTS = {
    "clp": {
        "u": 3.0,
        "score": "spectral",
        "include_fc": False,
        "u_low": None,
        "bias_rate": None,
        "topk": None,
    },
    "lpp": {"u": 3.0, "score": "l2", "include_fc": True, "u_low": -3.0, "bias_rate": 1.0, "topk": 0},
}


@dataclass
class _Loaded:
    model: onnx.ModelProto
    store: TensorStore
    path: str | None


def make_params(
    method: str = "clp",
    u: float | None = None,
    u_low: float | None = None,
    bias_rate: float | None = None,
    topk: int | None = None,
    score: str | None = None,
    include_fc: bool | None = None,
) -> Params:
    """Fill unset parameters with the method's defaults and check them."""
    if method not in METHODS:
        raise OnnxclpError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    d = DEFAULTS[method]
    if method == "clp" and any(x is not None for x in (u_low, bias_rate, topk)):
        raise OnnxclpError("--u-low, --bias-rate and --topk apply to --method lpp only")
    p = Params(
        method=method,
        u=float(d["u"] if u is None else u),
        u_low=float(d["u_low"] if u_low is None else u_low) if method == "lpp" else 0.0,
        bias_rate=float(d["bias_rate"] if bias_rate is None else bias_rate) if method == "lpp" else 0.0,
        topk=int(d["topk"] if topk is None else topk) if method == "lpp" else 0,
        score=d["score"] if score is None else score,
        include_fc=bool(d["include_fc"] if include_fc is None else include_fc),
    )
    if p.score not in ("spectral", "l2", "exact"):
        raise OnnxclpError(f"unknown score {p.score!r}: choose spectral, l2 or exact")
    for name in ("u", "u_low", "bias_rate"):
        v = getattr(p, name)
        if v != v or v in (float("inf"), float("-inf")):
            raise OnnxclpError(f"--{name.replace('_', '-')} must be a finite number")
    if method == "lpp":
        if p.u_low >= p.u:
            raise OnnxclpError(f"--u-low ({p.u_low}) must be below --u ({p.u})")
        if p.bias_rate < 0:
            raise OnnxclpError("--bias-rate must be >= 0")
        if p.topk < 0:
            raise OnnxclpError("--topk must be >= 0")
    return p


def _load(model_or_path: onnx.ModelProto | str | os.PathLike[str], base_dir: str | None) -> _Loaded:
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return _Loaded(model, TensorStore(model, Path(base_dir or ".")), None)
    model, store = load_model(model_or_path)
    return _Loaded(model, store, str(model_or_path))


def _run(loaded: _Loaded, params: Params, exclude: Sequence[str], fuse_bn: bool, edit: bool) -> Report:
    start = time.perf_counter()
    model, store = loaded.model, loaded.store
    fused = fuse_batchnorm(model, store) if fuse_bn else 0
    index = GraphIndex(model.graph)
    found = find_layers(index, store)
    skipped: list[Skip] = list(found.skipped) + find_nested(model)
    try:
        patterns = [re.compile(p) for p in exclude]
    except re.error as exc:
        raise OnnxclpError(f"--exclude: invalid regular expression ({exc})") from exc
    layers = []
    for layer in found.layers:
        names = (layer.key, layer.weight.tensor.name or "")
        hit = next((p.pattern for p in patterns if any(p.search(n) for n in names)), None)
        if hit is not None:
            skipped.append(Skip(layer.key, layer.op, f"excluded by --exclude {hit!r}", layer.weight.tensor.name))
        elif layer.is_fc and not params.include_fc and not (params.method == "lpp" and layer.is_output):
            skipped.append(
                Skip(
                    layer.key,
                    layer.op,
                    "fully connected: not scored by CLP (use --include-fc)",
                    layer.weight.tensor.name,
                )
            )
        else:
            layers.append(layer)
    scored, score_skips = score_layers(model, index, layers, store, params.score)
    skipped.extend(score_skips)
    decisions = decide(scored, params, index, store)
    report = Report(method=params.method, params=asdict(params), version=__version__, fused_batchnorms=fused)
    report.input = loaded.path
    report.skipped = [SkippedLayer(s.key, s.op, s.reason, s.weight) for s in skipped]
    report.layers = [_layer_report(d) for d in decisions]
    pruned = {d.scored.layer.key: d.selection.prune for d in decisions if d.selection.prune}
    if sum(len(v) for v in pruned.values()) >= 2:
        streams = residual_streams(index, [d.scored.layer for d in decisions])
        report.coupled = [CoupledChannels(c.channel, list(c.layers), c.merge) for c in coupled_prunes(streams, pruned)]
    if edit:
        editor = Editor(index, store)
        apply_decisions(editor, decisions)
        report.copied_tensors = list(editor.copies)
        annotate(model, report)
    report.time_s = time.perf_counter() - start
    return report


def _layer_report(d: Decision) -> LayerReport:
    layer, s = d.scored.layer, d.scored.scores
    th = d.selection.thresholds
    return LayerReport(
        node=layer.key,
        op=layer.op,
        weight=layer.weight.tensor.name or (layer.weight.node.output[0] if layer.weight.node else ""),
        channels=layer.channels,
        affine=layer.affine_key,
        role="output" if layer.is_output else "hidden",
        score=d.scored.kind,
        scores=[float(x) for x in s],
        score_min=float(s.min()),
        score_mean=float(s.mean()),
        score_max=float(s.max()),
        score_std=float(s.std(ddof=1)) if s.size > 1 else 0.0,
        threshold=th.upper if th else None,
        lower_threshold=th.lower if th else None,
        rescale_from=th.rescale_from if th else None,
        pruned=list(d.selection.prune),
        rescaled=dict(d.selection.rescale),
        topk_target=d.topk.target if d.topk else None,
        topk_zeroed=list(d.topk.columns) if d.topk else [],
        note=d.note,
    )


def _require_layers(report: Report) -> None:
    if not report.layers:
        reasons = "; ".join(f"{s.node}: {s.reason}" for s in report.skipped[:3])
        raise NothingToSanitize(
            "no layer can be scored (no Conv/ConvTranspose/Gemm/MatMul with a constant weight"
            + (f"; skipped: {reasons}" if reasons else "")
            + ")"
        )


def sanitize(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    method: str = "clp",
    u: float | None = None,
    *,
    u_low: float | None = None,
    bias_rate: float | None = None,
    topk: int | None = None,
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Sequence[str] = (),
    fuse_bn: bool = False,
    base_dir: str | None = None,
    inline_functions: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Sanitize a model with CLP (Zheng et al. 2022, section 4.5, Algorithm 1) or LPP (ALGORITHMS.md section 5).

    ``model_or_path`` is a ModelProto (not modified: a copy is edited; ``base_dir`` locates its external
    data) or a path (loaded safely). Returns the sanitized model and the report. Raises
    :class:`~onnxclp.errors.OnnxclpError` on bad input and
    :class:`~onnxclp.errors.NothingToSanitize` when no layer can be scored. ``inline_functions`` replaces
    calls of model-local functions by their bodies first (:mod:`onnxclp.passes.inline`), so that the layers
    inside them are scored; the returned model then has no local functions.
    """
    params = make_params(method, u, u_low, bias_rate, topk, score, include_fc)
    loaded, report = _sanitize(model_or_path, params, exclude, fuse_bn, base_dir, inline=inline_functions)
    return loaded.model, report


def _sanitize(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    params: Params,
    exclude: Sequence[str],
    fuse_bn: bool,
    base_dir: str | None,
    *,
    edit: bool = True,
    inline: bool = False,
) -> tuple[_Loaded, Report]:
    loaded = _load(model_or_path, base_dir)
    inlined: list[str] = []
    if inline:
        flat, inlined = _inline_functions(loaded.model)
        if inlined:
            store = TensorStore(flat, loaded.store.base_dir, loaded.store.source)
            store.size_hint = loaded.store.size_hint
            loaded.model, loaded.store = flat, store
    report = _run(loaded, params, exclude, fuse_bn, edit=edit)
    report.inlined_functions = inlined
    _require_layers(report)
    return loaded, report


def scan(
    model_or_path: onnx.ModelProto | str | os.PathLike[str],
    method: str = "clp",
    u: float | None = None,
    *,
    u_low: float | None = None,
    bias_rate: float | None = None,
    topk: int | None = None,
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Sequence[str] = (),
    base_dir: str | None = None,
    inline_functions: bool = False,
) -> Report:
    """The analysis of :func:`sanitize` (scores, thresholds, flagged channels) without editing anything."""
    params = make_params(method, u, u_low, bias_rate, topk, score, include_fc)
    _, report = _sanitize(model_or_path, params, exclude, False, base_dir, edit=False, inline=inline_functions)
    return report


def sanitize_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    method: str = "clp",
    u: float | None = None,
    *,
    u_low: float | None = None,
    bias_rate: float | None = None,
    topk: int | None = None,
    score: str | None = None,
    include_fc: bool | None = None,
    exclude: Sequence[str] = (),
    fuse_bn: bool = False,
    force: bool = False,
    inline_functions: bool = False,
) -> Report:
    """Sanitize ``src`` and write the result to ``dst`` atomically (``src`` is never modified).

    Refuses ``dst`` == ``src`` unless ``force``. The other arguments are those of :func:`sanitize`.
    """
    start = time.perf_counter()
    s, d = Path(src), Path(dst)
    if d.exists() and s.exists() and os.path.samefile(s, d) and not force:
        raise OnnxclpError(f"{d}: output is the input file; use --force to overwrite it")
    if d.is_dir():
        raise OnnxclpError(f"{d}: is a directory")
    params = make_params(method, u, u_low, bias_rate, topk, score, include_fc)
    loaded, report = _sanitize(s, params, exclude, fuse_bn, None, inline=inline_functions)
    report.output = str(d)
    report.written = save_model(loaded.model, loaded.store, d)
    report.time_s = time.perf_counter() - start
    return report
