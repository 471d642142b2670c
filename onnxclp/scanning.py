"""``scan`` over many models: expand paths, scan each (in this process, a process pool or on Ray), render.

Each model gives one JSON-ready object: ``path``, ``verdict``, ``target``, ``p_value`` (the model's, from the
combined rule of :func:`onnxclp.detect.verdict`), ``error``, ``exit_code``, ``detectors`` (statistic, own p-value,
calibrated p-value, threshold per detector), ``detectors_skipped`` (why each other detector did not apply) and
``report`` (the per-layer report). The verdict is ``suspicious``, ``clean``, ``unverified`` (read, but no selected
detector could examine it: the gate fails closed on it) or ``error`` (could not be read or scored: its own error
entry; the others are still scanned).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxclp.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_OUTLIERS, EXIT_UNVERIFIED, OnnxclpError

VERDICTS = ("suspicious", "clean", "unverified", "error")
DEFAULT_FPR = 0.01  # the CLI's --fpr default (docs/detect.md: the measured trade-off)


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
    fpr: float = DEFAULT_FPR
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
    and an error entry for each argument that matches nothing. A weight file ``X.onnx.data`` stands for its model
    ``X.onnx`` (a commit that changes only the weights is scanned: the pre-commit hook passes such files)."""
    files: list[str] = []
    missing: list[dict[str, Any]] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*.onnx") if f.is_file())
        elif p.exists() and arg.endswith(".onnx.data"):
            model = arg[: -len(".data")]
            if not os.path.isfile(model):
                missing.append(error_entry(arg, f"{arg}: external weights without their model {model}"))
                continue
            found = [model]
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
    return {"path": path, "verdict": "error", "target": None, "p_value": None, "error": message, "exit_code": code,
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
        # a model with no layer CLP can score (int8 QLinearConv/ConvInteger, no weights at all) is still the
        # detectors' to read, or to say why they cannot: unverified, not an error (issue 20, fail closed)
        state = run_method(path, params, options, allow_empty=True)
        results, skipped = detect.run_detectors(state, config.detectors)
        if not state.found:
            reasons = "; ".join(f"{s.node}: {s.reason}" for s in state.report.skipped[:3]) if state.report else ""
            skipped = {
                "layers": "no layer with a constant float weight to score" + (f" ({reasons})" if reasons else ""),
                **skipped,
            }
    except OnnxclpError as exc:
        return error_entry(path, exc.message, exc.exit_code)
    except MemoryError:
        return error_entry(path, "out of memory", EXIT_INTERNAL)
    except Exception as exc:  # a bug: reported per model, the others are still scanned
        return error_entry(path, f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
    verdict, target, p_model = detect.verdict(results, config.fpr)
    report = state.report
    assert report is not None
    report.verdict = {"verdict": verdict, "target": target, "fpr": config.fpr, "p_value": p_model}
    return {
        "path": path,
        "verdict": verdict,
        "target": target,
        "p_value": p_model,
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


def fails_gate(r: dict[str, Any], fail_on: str | None, allow_unverified: bool = False) -> bool:
    """Whether the model ``r`` (not an error entry) fails ``--fail-on``: a suspicious verdict, an unverified one
    (unless ``allow_unverified``) with ``suspicious``; any flagged channel with ``outliers``."""
    if fail_on == "suspicious":
        return r["verdict"] == "suspicious" or (r["verdict"] == "unverified" and not allow_unverified)
    if fail_on == "outliers":
        return r["report"] is not None and r["report"]["totals"]["pruned_channels"] > 0
    return False


def exit_code(results: list[dict[str, Any]], fail_on: str | None, allow_unverified: bool = False) -> int:
    """The most serious case over the models: an error's own code (the highest of 2, 3, 4: a model not scanned),
    then a finding (1), then an unverified model under ``--fail-on suspicious`` (6), then 0."""
    errors = [r.get("exit_code") or EXIT_INTERNAL for r in results if r["verdict"] == "error"]
    if errors:
        return max(errors)
    failed = [r for r in results if fails_gate(r, fail_on, allow_unverified)]
    if fail_on == "suspicious" and failed and all(r["verdict"] == "unverified" for r in failed):
        return EXIT_UNVERIFIED
    return EXIT_OUTLIERS if failed else EXIT_OK


def tally(results: list[dict[str, Any]]) -> str:
    """The closing line: ``18 models: 9 suspicious, 8 clean, 1 unverified, 0 errors``."""
    n = {v: sum(r["verdict"] == v for r in results) for v in VERDICTS}
    errors = f"{n['error']} error" + ("" if n["error"] == 1 else "s")
    return (
        f"{len(results)} model{'' if len(results) == 1 else 's'}: {n['suspicious']} suspicious, {n['clean']} clean, "
        f"{n['unverified']} unverified, {errors}"
    )


def _unverified_reason(r: dict[str, Any]) -> str:
    why = "; ".join(f"{n}: {reason}" for n, reason in (r.get("detectors_skipped") or {}).items())
    return "no selected detector could examine it" + (f" - {why}" if why else "")


def gate_lines(results: list[dict[str, Any]], fail_on: str | None, allow_unverified: bool = False) -> list[str]:
    """One line per model that fails ``--fail-on`` (error entries are named by :func:`print_errors`)."""
    lines = []
    for r in results:
        if r["verdict"] == "error" or not fails_gate(r, fail_on, allow_unverified):
            continue
        if r["verdict"] == "unverified" and fail_on == "suspicious":
            why = [_unverified_reason(r)]
        elif fail_on == "outliers":
            t = r["report"]["totals"]
            why = [f"{t['pruned_channels']} channel(s) flagged"]
        else:
            why = [f"target class {r['target']}"] if r["target"] is not None else []
            why += [f"{n} p={_fmt_p(d['p_value'])}" for n, d in r["detectors"].items() if d.get("suspicious")]
            why += [f"model p={_fmt_p(r['p_value'])}"] if r.get("p_value") is not None else []
        lines.append(f"FAIL {r['path']}: " + "; ".join([r["verdict"], *why]))
    return [_printable(x) for x in lines]


def next_step(
    results: list[dict[str, Any]], method: str = "clp", detectors: tuple[str, ...] = (), allow_unverified: bool = False
) -> str | None:
    """One line on what to do next: sanitize a suspicious model (a data-free method, and one for clean data, from
    the method registry), examine an unverified one with a detector that reads it; None when nothing is to do."""
    suspicious = [r["path"] for r in results if r["verdict"] == "suspicious"]
    unverified = [r for r in results if r["verdict"] == "unverified"]
    parts = []
    if suspicious:
        free, few = suggested_methods(method)
        model = suspicious[0] if len(suspicious) == 1 else "MODEL"
        text = f"onnxclp sanitize {model} OUT.onnx --method {free}"
        if few is not None:
            text += f" (with clean labelled images: --method {few} --clean-data CLEAN.npz)"
        parts.append(text + ", then evaluate the result")
    if unverified:
        ran = set(detectors) or set(_detector_defaults())
        other = _other_detector(ran)
        text = "an unverified model: " + (f"scan it with --detector {other}" if other else "check it by other means")
        skipped = [str(why) for r in unverified for why in (r.get("detectors_skipped") or {}).values()]
        if any("--input-shape" in why for why in skipped):  # a detector that runs it could, given the image size
            text = "an unverified model: its graph leaves the image size open, give it with --input-shape C,H,W"
            text += f" (or scan it with --detector {other})" if other else ""
        parts.append(text + ("" if allow_unverified else ", or accept it with --allow-unverified"))
    return _printable("next: " + "; ".join(parts)) if parts else None


def suggested_methods(method: str = "clp") -> tuple[str, str | None]:
    """The methods ``next:`` suggests, from the registry: a data-free one (a method marked ``suggested``, else the
    scan's own method when it needs nothing, else the first registered) and one that reads clean data (marked,
    else the first registered; None when there is none)."""
    from onnxclp import methods

    found = {n: methods.get(n) for n in methods.names()}

    def pick(needs: str, fallback: str | None) -> str | None:
        names = [n for n, m in found.items() if m.needs == needs]
        marked = [n for n in names if getattr(found[n], "suggested", False)]
        if marked:
            return marked[0]
        if fallback in names:
            return fallback
        return names[0] if names else None

    return pick("nothing", method) or method, pick("clean-data", None)


def _detector_defaults() -> list[str]:
    from onnxclp import detect

    return detect.default_names()


def _other_detector(ran: set[str]) -> str | None:
    """A registered detector that did not run, preferring one that runs the model (it reads any classifier)."""
    from onnxclp import detect

    rest = [n for n in detect.names() if n not in ran]
    runs_model = [n for n in rest if detect.get(n).extra is not None]
    name = (runs_model or rest or [None])[0]
    if name is None:
        return None
    extra = detect.get(name).extra
    return name + (f" (needs the '{extra}' extra)" if extra else "")


def _fmt_p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def render_text(results: list[dict[str, Any]], *, quiet: bool = False, verbose: bool = False) -> str:
    """Plain text, never truncated: one summary line per model, then (unless ``quiet``) its flagged layers with
    full names, one per line; the closing :func:`tally` last."""
    lines = []
    for r in results:
        if r["verdict"] == "error":  # on stderr, one line each (print_errors)
            continue
        t = r["report"]["totals"]
        det = "; ".join(f"{n} p={_fmt_p(d['p_value'])}" for n, d in r["detectors"].items())
        if r.get("p_value") is not None:  # the combined rule's (onnxclp.detect.verdict)
            det += f"; model p={_fmt_p(r['p_value'])}"
        target = f" (target class {r['target']})" if r["target"] is not None else ""
        if r["verdict"] == "unverified":  # the reasons: here with -q, else on the "not applied" lines below
            target = f" ({_unverified_reason(r) if quiet else 'no selected detector could examine it'})"
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
    lines.append(tally(results))
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
