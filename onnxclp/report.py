"""The report of a scan or sanitize: dataclasses first; JSON and the terminal table render them.

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
    notes: list[str] = field(default_factory=list)  # warnings a user must see (risky parameters, --force)
    verdict: dict[str, Any] | None = None  # scan's model-level verdict (onnxclp.detect), when computed
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


def _finite(x: Any) -> Any:
    """JSON has no NaN/Infinity: write them as strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _fmt_idx(idx: list[int], limit: int = 12) -> str:
    if not idx:
        return "-"
    s = ",".join(str(i) for i in idx[:limit])
    return s + (f",… (+{len(idx) - limit})" if len(idx) > limit else "")


def _text(s: str):
    """A name from the model as plain text: rich markup in it is not interpreted (``[/x]`` would raise,
    ``[link=...]`` would inject a link) and control characters (escape sequences, newlines) are shown escaped."""
    from rich.text import Text

    return Text("".join(c if c.isprintable() else repr(c)[1:-1] for c in s))


def print_report(report: Report, console=None, verbose: bool = False) -> None:
    """Render the report as tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:  # not a terminal (a CI log): as wide as the content, so no name is cut
        import sys

        console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 10_000)
    from onnxclp import methods

    lpp = methods.get(report.method).rescales  # the method may rescale channels: show that column
    table = Table(title=f"onnxclp {report.method} (score {report.params.get('score')}, u={report.params.get('u')})")
    for col in ("layer", "op", "ch", "affine", "min", "mean", "max", "thresh", "pruned"):
        table.add_column(col, justify="right" if col in ("ch", "min", "mean", "max", "thresh") else "left")
    if lpp:
        table.add_column("rescaled")
    for layer in report.layers:
        if not verbose and not (layer.pruned or layer.rescaled or layer.topk_zeroed) and len(report.layers) > 40:
            continue
        pruned = _fmt_idx(layer.pruned)
        if layer.topk_zeroed:
            pruned = f"class {layer.topk_target}: {len(layer.topk_zeroed)} weights zeroed"
        elif layer.role == "output":
            pruned = "(classifier)"
        row = [
            _text(layer.node),
            _text(layer.op),
            str(layer.channels),
            _text(layer.affine or "-"),
            f"{layer.score_min:.3g}",
            f"{layer.score_mean:.3g}",
            f"{layer.score_max:.3g}",
            "-" if layer.threshold is None else f"{layer.threshold:.3g}",
            pruned,
        ]
        if lpp:
            row.append(_fmt_idx(sorted(layer.rescaled)))
        table.add_row(*row)
    console.print(table)
    if report.skipped:
        skipped = Table(title="skipped")
        skipped.add_column("layer")
        skipped.add_column("op")
        skipped.add_column("reason")
        for s in report.skipped:
            skipped.add_row(_text(s.node), _text(s.op), _text(s.reason))
        console.print(skipped)
    if report.inlined_functions:
        console.print(
            _text(
                f"inlined {len(report.inlined_functions)} model-local functions (--inline-functions): "
                + ", ".join(report.inlined_functions[:6])
                + (" ..." if len(report.inlined_functions) > 6 else "")
            )
        )
    for c in report.coupled:
        names = ", ".join(c.layers[:4]) + (f" and {len(c.layers) - 4} more" if len(c.layers) > 4 else "")
        if c.kept is not None:
            text = (
                f"note: channel {c.channel} was flagged in {len(c.layers)} layers that write the same residual "
                f"stream ({names}; summed at {c.merge}): pruned only in {c.kept} (--streams strongest)"
            )
        else:
            text = (
                f"note: channel {c.channel} is pruned in {len(c.layers)} layers that write the same residual "
                f"stream ({names}; summed at {c.merge}): together they remove that channel of the "
                'stream for every later layer ("Residual streams" in docs/algorithms.md of the onnxclp source '
                "repository: an installed wheel has no docs folder)"
            )
        console.print(_text(text))
    t = report.totals()
    console.print(
        f"{t['scored_layers']} layers scored, {t['skipped_layers']} skipped; "
        f"{t['pruned_channels']} of {t['channels']} channels pruned"
        + (f", {t['rescaled_channels']} rescaled" if lpp else "")
        + (f", {t['classifier_weights_zeroed']} classifier weights zeroed" if t["classifier_weights_zeroed"] else "")
        + f" in {report.time_s:.2f} s"
    )
