"""The report of a scan or sanitize: the dataclasses and their JSON form (:mod:`onnxclp.render` draws them for
the terminal).

A layer is identified by its node name (or ``op#position`` when the node has none); every entry uses that key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerReport:
    """Scores and decisions for one scored layer."""

    node: str
    op: str
    weight: str
    channels: int
    affine: str | None
    role: str  # "hidden" or "output" (produces a model output: rows are classes)
    score: str
    scores: list[float]
    score_min: float
    score_mean: float
    score_max: float
    score_std: float
    threshold: float | None = None
    lower_threshold: float | None = None
    rescale_from: float | None = None
    pruned: list[int] = field(default_factory=list)
    rescaled: dict[int, float] = field(default_factory=dict)
    topk_target: int | None = None
    topk_zeroed: list[int] = field(default_factory=list)
    note: str | None = None


@dataclass
class SkippedLayer:
    """A layer that was not scored or not edited, and why."""

    node: str
    op: str
    reason: str
    weight: str | None = None


@dataclass
class CoupledChannels:
    """One channel pruned in several layers that write the same residual stream (:mod:`onnxclp.passes.streams`):
    together those prunes remove the channel from the stream for every later layer."""

    channel: int
    layers: list[str]
    merge: str
    kept: str | None = None  # stream rule 'strongest': the one layer where the channel stays pruned


@dataclass
class Report:
    """Everything a scan or sanitize found and did."""

    method: str
    params: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    input: str | None = None
    output: str | None = None
    written: list[str] = field(default_factory=list)
    fused_batchnorms: int = 0
    copied_tensors: list[str] = field(default_factory=list)
    coupled: list[CoupledChannels] = field(default_factory=list)
    inlined_functions: list[str] = field(default_factory=list)
    # edited initializers that are also graph inputs (IR version 3, keep_initializers_as_inputs): a runtime fed a
    # value for one runs with that value, sanitized or not (onnxclp.passes.annotate)
    initializer_inputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings a user must see (risky parameters, --force)
    verdict: dict[str, Any] | None = None  # scan's model-level verdict (onnxclp.detect), when computed
    guard: dict[str, Any] | None = None  # the accuracy guard's measurement and decision (onnxclp.guard)
    rewritten: list[dict[str, Any]] = field(default_factory=list)  # initializers a repair rewrote, with changes
    added_nodes: list[str] = field(default_factory=list)  # nodes a method added (NPD)
    training: dict[str, Any] | None = None  # a repair's settings and curve
    time_s: float = 0.0
    version: str = ""

    @property
    def pruned_channels(self) -> int:
        return sum(len(layer.pruned) for layer in self.layers)

    @property
    def rescaled_channels(self) -> int:
        return sum(len(layer.rescaled) for layer in self.layers)

    @property
    def flagged_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.pruned)

    @property
    def total_channels(self) -> int:
        return sum(layer.channels for layer in self.layers)

    def totals(self) -> dict[str, int]:
        return {
            "scored_layers": len(self.layers),
            "skipped_layers": len(self.skipped),
            "channels": self.total_channels,
            "pruned_channels": self.pruned_channels,
            "rescaled_channels": self.rescaled_channels,
            "layers_with_pruned_channels": self.flagged_layers,
            "classifier_weights_zeroed": sum(len(layer.topk_zeroed) for layer in self.layers),
        }

    def to_dict(self, timings: bool = True) -> dict[str, Any]:
        """A JSON-ready dict; ``timings=False`` drops the time so two runs compare byte for byte."""
        d = asdict(self)
        d["totals"] = self.totals()
        for layer in d["layers"]:
            layer["rescaled"] = {str(k): v for k, v in layer["rescaled"].items()}
        if not timings:
            d.pop("time_s")
        return _finite(d)

    def to_json(self, timings: bool = True) -> str:
        return json.dumps(self.to_dict(timings), indent=2, sort_keys=False) + "\n"


def report_from_dict(d: dict[str, Any]) -> Report:
    """A :class:`Report` back from its JSON form (:meth:`Report.to_dict`); fields this version does not know are
    left out."""
    from dataclasses import fields

    def pick(cls: Any, x: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in fields(cls)}
        return {k: v for k, v in x.items() if k in names}

    rep = Report(**{k: v for k, v in pick(Report, d).items() if k not in ("layers", "skipped", "coupled")})
    for x in d.get("layers", []):
        layer = LayerReport(**pick(LayerReport, x))
        layer.rescaled = {int(k): v for k, v in layer.rescaled.items()}
        rep.layers.append(layer)
    rep.skipped = [SkippedLayer(**pick(SkippedLayer, x)) for x in d.get("skipped", [])]
    rep.coupled = [CoupledChannels(**pick(CoupledChannels, x)) for x in d.get("coupled", [])]
    return rep


def _finite(x: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def unique_notes(notes: list[str]) -> list[str]:
    """Notes in first-seen order, each once; one seen n > 1 times ends with ``(×n)``."""
    counts: dict[str, int] = {}
    for n in notes:
        counts[n] = counts.get(n, 0) + 1
    return [n if c == 1 else f"{n} (×{c})" for n, c in counts.items()]
