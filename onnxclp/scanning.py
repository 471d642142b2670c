"""``scan`` over many models: expand paths, scan each (in this process, a process pool or on Ray), render.

Each model gives one JSON-ready object: ``path``, ``verdict`` (``clean``, ``suspicious`` or ``error``), ``target``,
``error``, ``detectors`` (statistic, p-value, threshold per detector), ``detectors_skipped`` and ``report`` (the
per-layer report). A model that cannot be read gets its own error entry; the others are still scanned.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxclp.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_OUTLIERS, OnnxclpError


@dataclass(frozen=True)
class ScanConfig:
    """Everything ``scan`` applies to each model (picklable: sent to worker processes)."""

    method: str = "clp"
    values: dict[str, Any] = field(default_factory=dict)
    score: str | None = None
    include_fc: bool | None = None
    exclude: tuple[str, ...] = ()
    inline_functions: bool = False
    detectors: tuple[str, ...] = ()
    fpr: float = 0.05
    force: bool = False
    streams: str = "strongest"
    context: dict[str, Any] = field(default_factory=dict)  # input geometry for detectors that run the model

    def check(self) -> None:
        """Refuse bad parameters once, before any model is read."""
        from onnxclp import detect
        from onnxclp.api import _check_risk
        from onnxclp.methods import make_params
        from onnxclp.pipeline import Options

        params = make_params(self.method, self.values, score=self.score, include_fc=self.include_fc)
        _check_risk(params, Options(force=self.force))
        for n in self.detectors:
            detect.get(n)


def expand_paths(paths: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Files, folders (every ``*.onnx`` below, sorted) and globs -> model files (in order, without duplicates),
    and an error entry for each argument that matches nothing."""
    files: list[str] = []
    missing: list[dict[str, Any]] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*.onnx") if f.is_file())
        elif p.exists():
            found = [arg]
        elif glob.has_magic(arg):
            found = sorted(f for f in glob.glob(arg, recursive=True) if os.path.isfile(f))
        else:
            found = []
        if not found:
            missing.append(error_entry(arg, f"{arg}: no such file, or no *.onnx in it", EXIT_BAD_INPUT))
        files += [f for f in found if f not in files]
    return files, missing


def error_entry(path: str, message: str, code: int = EXIT_BAD_INPUT) -> dict[str, Any]:
    return {"path": path, "verdict": "error", "target": None, "error": message, "exit_code": code,
            "detectors": {}, "detectors_skipped": {}, "report": None}  # fmt: skip


def scan_model(path: str, config: ScanConfig) -> dict[str, Any]:
    """Scan one model: its report and model-level verdict, or an error entry (never raises for a bad model)."""
    from onnxclp import detect
    from onnxclp.api import run_method
    from onnxclp.methods import make_params
    from onnxclp.pipeline import Options

    try:
        params = make_params(config.method, config.values, score=config.score, include_fc=config.include_fc)
        options = Options(
            config.exclude, False, config.inline_functions, False, config.force, config.context, config.streams
        )
        state = run_method(path, params, options)
        results, skipped = detect.run_detectors(state, config.detectors)
    except OnnxclpError as exc:
        return error_entry(path, exc.message, exc.exit_code)
    except MemoryError:
        return error_entry(path, "out of memory", EXIT_INTERNAL)
    except Exception as exc:  # a bug: reported per model, the others are still scanned
        return error_entry(path, f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
    verdict, target = detect.verdict(results, config.fpr)
    report = state.report
    assert report is not None
    report.verdict = {"verdict": verdict, "target": target, "fpr": config.fpr}
    return {
        "path": path,
        "verdict": verdict,
        "target": target,
        "error": None,
        "exit_code": EXIT_OK,
        "detectors": {n: r.to_dict() for n, r in results.items()},
        "detectors_skipped": skipped,
        "report": report.to_dict(timings=False),
    }


def scan_many(files: list[str], config: ScanConfig, workers: int | None = None, ray: str | None = None) -> list[dict]:
    """:func:`scan_model` over ``files``, in order; in parallel with ``workers`` > 1 or ``ray``."""
    if not files:
        return []
    if ray is None and (workers == 1 or len(files) == 1 or (workers is None and len(files) < 4)):
        return [scan_model(f, config) for f in files]
    from onnxclp.scale import run_tasks

    outcomes = run_tasks(_scan_task, [(f, config) for f in files], workers=workers, ray=ray)
    return [o.value if o.ok else error_entry(files[i], o.error or "worker failed", EXIT_INTERNAL)
            for i, o in enumerate(outcomes)]  # fmt: skip


def _scan_task(item: tuple[str, ScanConfig]) -> dict[str, Any]:
    return scan_model(*item)


def exit_code(results: list[dict[str, Any]], fail_on: str | None) -> int:
    """The worst case over the models: an error's own code (2, 3, 4) over a finding (1) over clean (0)."""
    code = EXIT_OK
    for r in results:
        c = r.get("exit_code", EXIT_OK)
        if r["verdict"] == "error":
            code = max(code, c)
            continue
        finding = (fail_on == "suspicious" and r["verdict"] == "suspicious") or (
            fail_on == "outliers" and r["report"]["totals"]["pruned_channels"] > 0
        )
        if finding:
            code = max(code, EXIT_OUTLIERS)
    return code


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def render_text(results: list[dict[str, Any]], *, quiet: bool = False, verbose: bool = False) -> str:
    """Plain text, never truncated: one summary line per model, then (unless ``quiet``) its flagged layers with
    full names, one per line."""
    lines = []
    for r in results:
        if r["verdict"] == "error":  # on stderr, one line each (print_errors)
            continue
        t = r["report"]["totals"]
        det = "; ".join(f"{n} p={_fmt_p(d['p_value'])}" for n, d in r["detectors"].items())
        target = f" (target class {r['target']})" if r["target"] is not None else ""
        lines.append(
            f"{r['path']}: {r['verdict']}{target}; {t['pruned_channels']} of {t['channels']} channels flagged in "
            f"{t['layers_with_pruned_channels']} of {t['scored_layers']} layers" + (f"; {det}" if det else "")
        )
        if quiet:
            continue
        layers = r["report"]["layers"]
        for layer in layers:
            if verbose or len(layers) <= 40 or layer["pruned"] or layer["rescaled"]:
                lines.append(
                    f"  {layer['node']} ({layer['op']}, {layer['channels']} ch, {layer['role']}): "
                    f"scores {layer['score_min']:.3g}..{layer['score_max']:.3g}, flagged {layer['pruned'] or '-'}"
                    + (f", rescaled {sorted(int(k) for k in layer['rescaled'])}" if layer["rescaled"] else "")
                    + ("" if layer["threshold"] is None else f"; threshold {layer['threshold']:.4g}")
                )
        for c in r["report"]["coupled"]:
            names = ", ".join(c["layers"])
            if c.get("kept"):
                lines.append(
                    f"  note: channel {c['channel']} was flagged in {len(c['layers'])} layers that write the same "
                    f"residual stream ({names}; summed at {c['merge']}): pruned only in {c['kept']} (--streams strongest)"
                )
            else:
                lines.append(
                    f"  note: channel {c['channel']} is pruned in {len(c['layers'])} layers that write the same "
                    f"residual stream ({names}; summed at {c['merge']}): together they remove that channel of the stream"
                )
        for s in r["report"]["skipped"]:
            lines.append(f"  skipped {s['node']} ({s['op']}): {s['reason']}")
        for n, why in r.get("detectors_skipped", {}).items():
            lines.append(f"  detector {n} not applied: {why}")
    return "".join(_printable(x) + "\n" for x in lines)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def print_errors(results: list[dict[str, Any]]) -> None:
    """One line ``error: ...`` on stderr per model that could not be scanned."""
    import sys

    for r in results:
        if r["verdict"] == "error":
            message = r["error"] if r["path"] in r["error"] else f"{r['path']}: {r['error']}"
            sys.stderr.write(f"error: {_printable(message)}\n")
