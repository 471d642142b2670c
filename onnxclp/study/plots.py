"""Figures (matplotlib, Agg backend, PNG): the sweep (CLP paper Figure 4), score histograms per layer with the
thresholds and the flagged channels, and TAC against score per layer (CLP paper Figure 3).

Each function writes its file(s) and returns the path(s). matplotlib is imported inside them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

__all__ = ["plot_scores", "plot_sweep", "plot_sweeps", "plot_tac"]

PER_PAGE = 20
DPI = 80


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(name: str, n: int = 34) -> str:
    return name if len(name) <= n else "…" + name[-(n - 1) :]


def _sweep_axes(ax, result: Any, title: str | None) -> None:
    points = sorted((p for p in result.points if p.u is not None), key=lambda p: p.u)
    us = [p.u for p in points]
    pct = [(p.acc, p.asr) for p in points]
    ax.plot(us, [100 * a for a, _ in pct], "o-", color="tab:blue", ms=3, label="ACC")
    if result.baseline_asr is not None:
        ax.plot(us, [100 * (s or 0) for _, s in pct], "s-", color="tab:red", ms=3, label="ASR")
        ax.axhline(100 * result.baseline_asr, color="tab:red", ls=":", lw=1)
    if result.baseline_acc is not None:
        ax.axhline(100 * result.baseline_acc, color="tab:blue", ls=":", lw=1)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("u")
    ax.set_ylabel("%")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(us, [100 * p.pruned_fraction for p in points], "^--", color="tab:gray", ms=3, label="pruned")
    twin.set_ylabel("channels pruned (%)", color="tab:gray")
    twin.tick_params(axis="y", colors="tab:gray")
    twin.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    ax.set_title(title or f"{result.method.upper()}: {_short(Path(result.model).name or result.model)}")


def plot_sweep(result: Any, path: PathLike, title: str | None = None) -> Path:
    """ACC and ASR (left axis) and the fraction of channels pruned (right axis) against u; dotted lines: the
    model before sanitizing."""
    return plot_sweeps([result], path, [title] if title else None)


def plot_sweeps(results: Sequence[Any], path: PathLike, titles: Sequence[str] | None = None, cols: int = 2) -> Path:
    """:func:`plot_sweep` for several sweeps, one panel each."""
    plt = _plt()
    n = len(results)
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _sweep_axes(ax, results[i], titles[i] if titles else None)
        else:
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _pages(items: Sequence[Any], per_page: int) -> list[Sequence[Any]]:
    return [items[i : i + per_page] for i in range(0, len(items), per_page)] or [[]]


def _grid(plt, n: int):
    cols = min(5, max(1, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, axes.flat


def plot_scores(report: Any, directory: PathLike, per_page: int = PER_PAGE, prefix: str = "scores") -> list[Path]:
    """Histograms of the channel scores of every scored layer (a grid of up to ``per_page`` layers per PNG):
    the upper threshold (red dashed), LPP's lower threshold (blue dashed) and start of the rescale band (orange
    dotted), and the flagged channels as red ticks under the axis. Returns the files written
    (``DIR/scores.png``, or ``scores-1.png``, ``scores-2.png``... for many layers)."""
    import numpy as np

    plt = _plt()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pages = _pages(report.layers, per_page)
    written = []
    for number, layers in enumerate(pages, 1):
        fig, axes = _grid(plt, len(layers))
        for ax, layer in zip(axes, layers, strict=False):
            s = np.asarray(layer.scores, dtype=np.float64)
            ax.hist(s, bins=min(40, max(5, s.size // 3)), color="tab:gray")
            for value, style in (
                (layer.threshold, dict(color="tab:red", ls="--")),
                (layer.lower_threshold, dict(color="tab:blue", ls="--")),
                (layer.rescale_from, dict(color="tab:orange", ls=":")),
            ):
                if value is not None and np.isfinite(value):
                    ax.axvline(value, lw=1.2, **style)
            if layer.pruned:
                ax.plot(s[layer.pruned], np.zeros(len(layer.pruned)), "|", color="tab:red", ms=14, mew=2)
            flag = f", {len(layer.pruned)} pruned" if layer.pruned else ""
            role = " (classifier)" if layer.role == "output" else ""
            ax.set_title(f"{_short(layer.node, 28)}{role}\n{layer.channels} ch{flag}", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(
            f"onnxclp {report.method}: channel scores ({report.params.get('score')}, u={report.params.get('u')})"
        )
        fig.tight_layout()
        name = f"{prefix}.png" if len(pages) == 1 else f"{prefix}-{number}.png"
        fig.savefig(directory / name, dpi=DPI)
        plt.close(fig)
        written.append(directory / name)
    return written


def plot_tac(result: Any, path: PathLike, per_page: int = PER_PAGE, hidden_only: bool = True) -> list[Path]:
    """TAC against score per layer (CLP paper Figure 3): one point per channel, pruned channels in red, the
    upper threshold as a red dashed line. ``path`` ``x.png`` becomes ``x-1.png``, ``x-2.png``... for many layers."""
    import numpy as np

    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = [layer for layer in result.layers if not (hidden_only and layer.role == "output")]
    pages = _pages(layers, per_page)
    written = []
    for number, chunk in enumerate(pages, 1):
        fig, axes = _grid(plt, len(chunk))
        for ax, layer in zip(axes, chunk, strict=False):
            s, t = np.asarray(layer.scores), np.asarray(layer.tac)
            keep = np.ones(s.size, bool)
            keep[layer.pruned] = False
            ax.scatter(s[keep], t[keep], s=6, color="tab:blue", alpha=0.6)
            ax.scatter(s[~keep], t[~keep], s=14, color="tab:red")
            if layer.threshold is not None and np.isfinite(layer.threshold):
                ax.axvline(layer.threshold, color="tab:red", ls="--", lw=1)
            rho = layer.rho
            ax.set_title(
                f"{_short(layer.node, 28)}\nrho={'n/a' if rho is None else f'{rho:.2f}'}, {len(layer.pruned)} pruned",
                fontsize=8,
            )
            ax.tick_params(labelsize=7)
        fig.supxlabel(f"channel score ({result.params.get('score')})")
        fig.supylabel("TAC")
        fig.suptitle(f"TAC vs score: {result.attack.get('attack')} ({result.method}, u={result.params.get('u')})")
        fig.tight_layout()
        out = path if len(pages) == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")
        fig.savefig(out, dpi=DPI)
        plt.close(fig)
        written.append(out)
    return written


def write_score_plots(report: Any, directory: PathLike) -> list[Path]:
    """``scan --plot DIR``: score histograms per layer; prints the files written on stderr."""
    import sys
    from types import SimpleNamespace

    from onnxclp.errors import OnnxclpError

    if isinstance(report, dict):  # a scan's JSON entry: attribute access for plot_scores
        report = SimpleNamespace(**{**report, "layers": [SimpleNamespace(**layer) for layer in report["layers"]]})
    try:
        written = plot_scores(report, directory)
    except OSError as exc:
        raise OnnxclpError(f"{directory}: cannot write the plots ({exc.strerror or exc})") from exc
    for p in written:
        sys.stderr.write(f"wrote {p}\n")
    return written
