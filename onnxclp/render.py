"""A :class:`~onnxclp.report.Report` for people: readable layer names, the title, the layer table (rich for a
terminal, plain text otherwise) and the notes.

Apart from :mod:`onnxclp.report` (the data), the title and the summary ask the method registry
(:mod:`onnxclp.methods`) which parameters a method has and whether it rescales: the methods sit below the
renderer, above the report's dataclasses.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from onnxclp.report import Report


def _fmt_idx(idx: list[int], limit: int | None = 12, sep: str = ",") -> str:
    """Channel indices as text; ``limit`` None lists them all, else the first ``limit`` and a count of the rest."""
    if not idx:
        return "-"
    shown = idx if limit is None else idx[:limit]
    s = sep.join(str(i) for i in shown)
    return s + (f"{sep}… (+{len(idx) - len(shown)})" if len(idx) > len(shown) else "")


def _printable(s: str) -> str:
    """Control characters (escape sequences, newlines) from a hostile file shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def _text(s: str):
    """A name from the model as plain text: rich markup in it is not interpreted (``[/x]`` would raise,
    ``[link=...]`` would inject a link) and control characters (escape sequences, newlines) are shown escaped."""
    from rich.text import Text

    return Text(_printable(s))


# Names an exporter makes up: dynamo's node_Conv_291 / node_linear, onnx::Conv_89, val_12, Conv_12 (the older torch
# exporter), Conv__32 and const_fold_opt__57 (tf2onnx), op#position (onnxclp's key of a node without a name).
_MADE_UP = re.compile(r"(node_|onnx::|val_)\S*|[A-Za-z][A-Za-z_]*?_+\d+|[A-Za-z]+#\d+|")
# A framework's parameter path: layer1.0.conv1.weight, features.0.weight.
_PARAMETER = re.compile(r"[A-Za-z_]\w*(\.\w+)+")


def _scope_name(node: str) -> str | None:
    """The module path in a torch.onnx (TorchScript) node name: ``/layer1/layer1.0/conv1/Conv`` ->
    ``layer1.0.conv1`` (a scope that extends the one before it, ``layer1`` -> ``layer1.0``, replaces it)."""
    parts = [p for p in node.split("/") if p][:-1]  # the last part is the operator
    out: list[str] = []
    for p in parts:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p
        else:
            out.append(p)
    return ".".join(out) or None


def layer_name(node: str, weight: str | None = None) -> str:
    """A readable name of a layer for the terminal: the weight's parameter path without ``.weight``
    (``node_Conv_291`` with weight ``layer1.0.conv1.weight`` -> ``layer1.0.conv1``), else the module path of a
    TorchScript node name, else the weight's name where the node name is made up by the exporter, else the node
    name. The report's JSON keeps the node name (``node``) and the weight's (``weight``)."""
    if weight and _PARAMETER.fullmatch(weight):
        return weight.removesuffix(".weight")
    if node.startswith("/"):
        scoped = _scope_name(node)
        if scoped:
            return scoped
    if _MADE_UP.fullmatch(node) and weight and not _MADE_UP.fullmatch(weight):
        return weight
    return node


def display_names(report: Report) -> dict[str, str]:
    """Node key -> :func:`layer_name` for every scored and skipped layer; a name two layers would share falls back
    to their node keys, so that every row names one layer."""
    names = {layer.node: layer_name(layer.node, layer.weight) for layer in report.layers}
    for s in report.skipped:
        names.setdefault(s.node, layer_name(s.node, s.weight))
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {key: (name if counts[name] == 1 else key) for key, name in names.items()}


def report_title(report: Report) -> str:
    """``onnxclp clp (u=3.0, score=spectral)``: the parameters the method has, the score when it has one, and
    include_fc only when on."""
    from onnxclp import methods

    params = report.params
    try:
        own = [p.name for p in methods.get(report.method).params]
    except Exception:  # a report of a method this version does not have
        own = [k for k in params if k not in ("method", "score", "include_fc")]
    shown = [f"{k}={params[k]}" for k in own if k in params]
    if params.get("score"):
        shown.append(f"score={params['score']}")
    if params.get("include_fc"):
        shown.append("include_fc")
    return f"onnxclp {report.method}" + (f" ({', '.join(shown)})" if shown else "")


STREAMS_DOC = (
    '"Residual streams" in docs/algorithms.md of the onnxclp source repository (an installed wheel has no docs folder)'
)


def coupled_notes(coupled: list[Any], names: dict[str, str] | None = None) -> list[str]:
    """One note per group of coupled channels (same layers, same merge, same kept layer) instead of one per
    channel: OTBR's global ratio can couple dozens of channels of one stream. ``coupled``: CoupledChannels or
    their JSON dicts; ``names``: node key -> display name."""
    names = names or {}
    groups: dict[tuple[tuple[str, ...], str, str | None], list[int]] = {}
    for c in coupled:
        d = c if isinstance(c, dict) else asdict(c)
        groups.setdefault((tuple(d["layers"]), d["merge"], d.get("kept")), []).append(int(d["channel"]))
    out = []
    for (layers, merge, kept), channels in groups.items():
        shown = [names.get(x, x) for x in layers]
        where = ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")
        merge_name = names.get(merge, _scope_name(merge) if merge.startswith("/") else merge) or merge
        which = f"channel {channels[0]}" if len(channels) == 1 else f"channels {', '.join(map(str, channels))}"
        stream = f"{len(layers)} layers that write the same residual stream ({where}; summed at {merge_name})"
        if kept is not None:
            out.append(
                f"note: {which} flagged in {stream}: pruned only in {names.get(kept, kept)} (--streams strongest)"
            )
        else:
            them = "that channel" if len(channels) == 1 else "those channels"
            out.append(
                f"note: {which} pruned in {stream}: together they remove {them} of the stream for every later layer"
            )
    if any(kept is None for _, _, kept in groups):
        out.append(f"note: see {STREAMS_DOC}")
    return out


def _method(name: str) -> Any:
    """The registered method class of a report's method; None for one this version does not have."""
    from onnxclp import methods

    try:
        return methods.get(name)
    except Exception:  # a report of a method this version does not have
        return None


def _repair(method: str) -> bool:
    """Whether ``method`` is a repair that scores no channels (fine-tuning, the gates, NPD): its report has no layer
    table, and fully connected layers are not "not scored" by it."""
    m = _method(method)
    return m is not None and getattr(m, "rewrites", None) is not None and m.score is None


def _summary(report: Report) -> str:
    t = report.totals()
    if not report.layers and _repair(report.method):
        changed = [f"{len(report.rewritten)} initializers rewritten"] if report.rewritten else []
        changed += [f"{len(report.added_nodes)} nodes added"] if report.added_nodes else []
        return (
            f"{report.method}: no channel scored or pruned (a repair); {', '.join(changed) or 'nothing changed'} in "
            + (f"{report.time_s:.2f} s")
        )
    return (
        f"{t['scored_layers']} layers scored, {t['skipped_layers']} skipped; "
        f"{t['pruned_channels']} of {t['channels']} channels pruned"
        + (f", {t['rescaled_channels']} rescaled" if _rescales(report.method) else "")
        + (f", {t['classifier_weights_zeroed']} classifier weights zeroed" if t["classifier_weights_zeroed"] else "")
        + f" in {report.time_s:.2f} s"
    )


def _rescales(method: str) -> bool:
    m = _method(method)
    return m is not None and bool(m.rescales)


Columns = list[tuple[str, bool]]  # (header, right-aligned)
AFFINE_MARK = "*"
AFFINE_NOTE = f"{AFFINE_MARK} scored with the per-channel affine (BatchNorm) that follows it: the report's 'affine'"


def _rows(
    report: Report, verbose: bool, names: dict[str, str], limit: int | None, sep: str, affine: str = "column"
) -> tuple[Columns, list[list[str]], int]:
    """The layer table: columns, rows (strings) and how many unchanged layers were left out (more than 40 layers,
    not ``verbose``). ``affine``: 'column' (the readable names of the paired affine, a column shown only when some
    layer has one) or 'mark' (:data:`AFFINE_MARK` after the layer's name). The threshold column only when some
    layer has one (OTBR's global ratio has none)."""
    lpp = _rescales(report.method)
    shown = [
        layer
        for layer in report.layers
        if verbose or layer.pruned or layer.rescaled or layer.topk_zeroed or len(report.layers) <= 40
    ]
    affine_col = affine == "column" and any(layer.affine for layer in shown)
    thresh = any(layer.threshold is not None for layer in shown)
    cols: Columns = [("layer", False), ("op", False), ("ch", True)]
    cols += [("affine", False)] if affine_col else []
    cols += [("min", True), ("mean", True), ("max", True)]
    cols += [("thresh", True)] if thresh else []
    cols += [("pruned", False)] + ([("rescaled", False)] if lpp else [])
    rows = []
    for layer in shown:
        pruned = _fmt_idx(layer.pruned, limit, sep)
        if layer.topk_zeroed:
            pruned = f"class {layer.topk_target}: {len(layer.topk_zeroed)} weights zeroed"
        elif layer.role == "output":
            pruned = "(classifier)"
        name = names.get(layer.node, layer.node)
        row = [name + (f" {AFFINE_MARK}" if affine == "mark" and layer.affine else ""), layer.op, str(layer.channels)]
        if affine_col:
            row.append(", ".join(layer_name(a.strip()) for a in layer.affine.split(",")) if layer.affine else "-")
        row += [f"{layer.score_min:.3g}", f"{layer.score_mean:.3g}", f"{layer.score_max:.3g}"]
        if thresh:
            row.append("-" if layer.threshold is None else f"{layer.threshold:.3g}")
        row.append(pruned)
        if lpp:
            row.append(_fmt_idx(sorted(layer.rescaled), limit, sep))
        rows.append(row)
    return cols, rows, len(report.layers) - len(shown)


_GAP = 2  # between two columns of a rich table with box.SIMPLE_HEAD, show_edge=False, collapse_padding=True
_PRIORITY = ("layer", "pruned", "rescaled", "reason", "affine")  # who gets the room left, first


def _natural(cols: Columns, rows: list[list[str]]) -> list[int]:
    return [max([len(c), *(len(_printable(r[i])) for r in rows)]) for i, (c, _) in enumerate(cols)]


def _widths(cols: Columns, rows: list[list[str]], total: int) -> dict[int, int] | None:
    """Widths of the wrapped columns (names, channel lists, reasons) so that the table fits ``total`` columns: the
    right-aligned columns and ``op`` at their natural width; each wrapped column at least its longest word (up to
    24 characters for the name, 12 for the others); then the name up to 40 % of the width, the others in the order
    of _PRIORITY, and the name again. None when not even 8 characters are left for the name (rich decides)."""
    natural = _natural(cols, rows)
    flex = [i for i, (c, right) in enumerate(cols) if not right and c != "op"]
    room = total - _GAP * (len(cols) - 1) - sum(n for i, n in enumerate(natural) if i not in flex)
    widths = {}
    for i in flex:
        word = max([len(w) for r in rows for w in _printable(r[i]).split()] or [1])
        widths[i] = min(natural[i], max(len(cols[i][0]), min(word, 24 if cols[i][0] == "layer" else 12)))
    room -= sum(widths.values())
    name = next((i for i in flex if cols[i][0] == "layer"), None)
    if room < 0 and name is not None and widths[name] + room >= 8:  # a long name: narrower, folded
        widths[name] += room
        room = 0
    if room < 0:
        return None

    def grow(i: int, up_to: int) -> None:
        nonlocal room
        more = max(0, min(up_to - widths[i], room))
        widths[i] += more
        room -= more

    if name is not None:
        grow(name, min(natural[name], int(total * 0.4)))
    for i in sorted(flex, key=lambda i: _PRIORITY.index(cols[i][0]) if cols[i][0] in _PRIORITY else len(_PRIORITY)):
        grow(i, natural[i])
    return widths


def _hidden_line(hidden: int) -> str:
    return f"({hidden} layers with nothing pruned not listed: --verbose lists them)"


def _tail(report: Report, names: dict[str, str]) -> list[str]:
    """The lines after the tables: inlined functions, coupled channels (one note per group), the totals."""
    out = []
    if report.inlined_functions:
        out.append(
            f"inlined {len(report.inlined_functions)} model-local functions (--inline-functions): "
            + ", ".join(report.inlined_functions[:6])
            + (" ..." if len(report.inlined_functions) > 6 else "")
        )
    out += coupled_notes(report.coupled, names)
    out.append(_summary(report))
    return out


def _skipped_rows(report: Report, names: dict[str, str]) -> list[list[str]]:
    # a repair that scored no channel: its fully connected layers' "not scored" says nothing (the JSON keeps them)
    repair = not report.layers and _repair(report.method)
    return [[names.get(s.node, s.node), s.op, s.reason] for s in report.skipped
            if not (repair and s.reason.startswith("fully connected: not scored"))]  # fmt: skip


def render_plain(report: Report, verbose: bool = False) -> str:
    """The report as plain text for a log or a pipe: aligned columns, every name and every channel list complete
    (nothing cut, however long), one line per layer."""
    names = display_names(report)
    cols, rows, hidden = _rows(report, verbose, names, None, ",")
    lines = [report_title(report)]
    table = [[c for c, _ in cols], *[[_printable(x) for x in row] for row in rows]]
    if not rows and _repair(report.method):  # no layer table for a repair
        table = []
    widths = _natural(cols, rows)
    last = len(cols) - 1
    for r in table:
        cells = [
            r[i] if i == last else (r[i].rjust(widths[i]) if right else r[i].ljust(widths[i]))
            for i, (_, right) in enumerate(cols)
        ]
        lines.append("  ".join(cells).rstrip())
    if hidden:
        lines.append(_hidden_line(hidden))
    lines += [_printable(f"skipped {name} ({op}): {reason}") for name, op, reason in _skipped_rows(report, names)]
    lines += [_printable(x) for x in _tail(report, names)]
    return "".join(line + "\n" for line in lines)


def _table(title: str, cols: Columns, rows: list[list[str]], width: int):
    from rich import box
    from rich.table import Table

    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
        title_justify="left",
    )
    widths = _widths(cols, rows, width) or {}
    for i, (name, right) in enumerate(cols):
        if right:
            table.add_column(name, justify="right", no_wrap=True)
        else:  # names, channel lists, reasons: wrapped (at ", " first), never cut
            table.add_column(name, overflow="fold", width=widths.get(i))
    for row in rows:
        table.add_row(*[_text(x) for x in row])
    return table


def print_report(report: Report, console=None, verbose: bool = False) -> None:
    """Render the report: on a terminal (or the rich ``console`` given) as tables that fit its width, names
    wrapped and never cut; elsewhere (a pipe, a CI log) as :func:`render_plain`'s lines."""
    import sys

    if console is None and not sys.stdout.isatty():
        sys.stdout.write(render_plain(report, verbose))
        sys.stdout.flush()
        return
    from rich.console import Console

    if console is None:
        console = Console(highlight=False)
    names = display_names(report)
    limit = None if verbose else 12
    cols, rows, hidden = _rows(report, verbose, names, limit, ", ")
    mark = False
    if sum(_natural(cols, rows)) + _GAP * (len(cols) - 1) > console.width and any(c == "affine" for c, _ in cols):
        cols, rows, hidden = _rows(report, verbose, names, limit, ", ", affine="mark")  # too narrow for the names
        mark = True
    if rows or not _repair(report.method):
        console.print(_table(report_title(report), cols, rows, console.width))
    else:  # a repair: no layer table
        console.print(_text(report_title(report)), overflow="fold")
    if mark:
        console.print(_text(AFFINE_NOTE), overflow="fold")
    if hidden:
        console.print(_hidden_line(hidden))
    skipped_rows = _skipped_rows(report, names)
    if skipped_rows:
        skipped = [("layer", False), ("op", False), ("reason", False)]
        console.print(_table("skipped", skipped, skipped_rows, console.width))
    for line in _tail(report, names):
        console.print(_text(line), overflow="fold")
