"""SARIF 2.1.0 output for ``onnxclp scan``: the results of many models as one code-scanning log.

:func:`to_sarif` turns the list that ``onnxclp scan --format json`` prints (one object per model:
``path``, ``verdict``, ``target``, ``error``, ``detectors``, ``report``) into a SARIF 2.1.0 log that
GitHub code scanning, the VS Code SARIF viewer and other SARIF consumers read.

Rules (stable ids; never renumber, only append):

========== ================== ======= ================= ===============================================
ruleId     name               level   security-severity one result per
========== ================== ======= ================= ===============================================
ONNXCLP001 model-suspicious   error   8.0 (high)        model whose verdict is ``suspicious``
ONNXCLP002 channel-outlier    warning 5.0 (medium)      flagged channel (``report.layers[i].pruned``);
                                                        ``note`` when the model's verdict is ``clean``
ONNXCLP003 scan-error         error   7.0 (high)        model that could not be read or scored
ONNXCLP004 layer-skipped      note    none              layer the tool could not score (reason given)
ONNXCLP005 nothing-scored     warning 4.0 (medium)      model read without error but with no scored layer
ONNXCLP006 model-unverified   error   7.0 (high)        model no selected detector could examine (verdict
                                                        ``unverified``); ``warning`` when it does not fail
                                                        the gate (``--allow-unverified``, ``--fail-on``
                                                        outliers or never)
========== ================== ======= ================= ===============================================

Every result carries ``partialFingerprints["onnxclpFinding/v1"]``: a SHA-256 of rule id, model path
(relative to ``base_dir``), layer node and channel. Scores, thresholds and p-values are not part of it,
so a re-run, a retrained-but-same-layout model or a changed ``--fpr`` keeps the alert identity.

Pure Python and the standard library only: this module must stay importable without torch or
onnxruntime (``scan`` is the CI step and installs neither).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any
from urllib.parse import quote

__all__ = ["FINGERPRINT_KEY", "RULES", "SARIF_SCHEMA_URI", "SARIF_VERSION", "SRCROOT", "rule_table", "to_sarif"]

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SRCROOT = "%SRCROOT%"
FINGERPRINT_KEY = "onnxclpFinding/v1"

_DOCS = "docs/ci.md"
_SEMVER = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")

# Each rule: id, name, default level, security-severity (None: not a security alert), precision, tags, texts.
RULES: tuple[dict[str, Any], ...] = (
    {
        "id": "ONNXCLP001",
        "name": "model-suspicious",
        "level": "error",
        "security_severity": "8.0",
        "precision": "medium",
        "tags": ["security", "backdoor", "onnx", "ml-model"],
        "short": "Model is likely backdoored",
        "full": (
            "A model-level detector rejected the hypothesis that this ONNX model is clean at the configured "
            "false-positive rate (--fpr): its weights look like those of a backdoored (trojaned) model."
        ),
        "help": (
            "Do not deploy this model as is. Find where it came from, run `onnxclp sanitize` to prune the "
            "flagged channels and evaluate the result on held-out data, or retrain from a trusted source. "
            "The result's properties hold each detector's statistic, p-value and threshold and the suspected "
            "target class. The gate's false-positive rate is set with --fpr; see docs/detect.md."
        ),
    },
    {
        "id": "ONNXCLP002",
        "name": "channel-outlier",
        "level": "warning",
        "security_severity": "5.0",
        "precision": "low",
        "tags": ["security", "backdoor", "onnx", "ml-model"],
        "short": "Channel with an outlying Lipschitz score",
        "full": (
            "A channel of this layer has an upper bound on its Lipschitz constant far above the layer's other "
            "channels (CLP/LPP outlier): backdoor triggers are typically carried by such channels. Clean models "
            "have a few outliers too, which is why the model-level verdict (ONNXCLP001) is the gate."
        ),
        "help": (
            "`onnxclp sanitize` prunes this channel. On its own an outlier is weak evidence: look at it together "
            "with the model's verdict. The result's properties hold the channel's score, the layer's threshold, "
            "mean and standard deviation. In a model whose verdict is clean the result has level note."
        ),
    },
    {
        "id": "ONNXCLP003",
        "name": "scan-error",
        "level": "error",
        "security_severity": "7.0",
        "precision": "very-high",
        "tags": ["security", "onnx", "ml-model", "correctness"],
        "short": "Model could not be scanned",
        "full": (
            "onnxclp could not read or score this file (malformed or truncated ONNX, missing external data, an "
            "unsupported graph, or input refused as hostile, e.g. external data outside the model's folder). "
            "The model was not checked for backdoors."
        ),
        "help": (
            "An unscanned model is an unverified model: it must not pass the gate silently. Fix or replace the "
            "file and re-run; the message holds the reason. `onnxclp scan` exits 2 when any model errors."
        ),
    },
    {
        "id": "ONNXCLP004",
        "name": "layer-skipped",
        "level": "note",
        "security_severity": None,
        "precision": "very-high",
        "tags": ["onnx", "ml-model", "coverage"],
        "short": "Layer not scored",
        "full": (
            "This layer was not scored (for example a fully connected layer under CLP without --include-fc, or a "
            "weight the tool cannot map to output channels): a backdoor carried only by it would go unseen."
        ),
        "help": (
            "Informational. The message holds the reason; some reasons name an option that scores the layer "
            "(--include-fc, --inline-functions)."
        ),
    },
    {
        "id": "ONNXCLP005",
        "name": "nothing-scored",
        "level": "warning",
        "security_severity": "4.0",
        "precision": "very-high",
        "tags": ["security", "onnx", "ml-model", "coverage"],
        "short": "No layer of the model could be scored",
        "full": (
            "The model was read, but no layer was scored, so its verdict says nothing about backdoors. "
            "`onnxclp scan` exits 3 in this case."
        ),
        "help": (
            "Check the skipped layers (ONNXCLP004) for the reasons; --include-fc or --inline-functions may make "
            "layers scorable. Transformer-only models are not covered by CLP/LPP."
        ),
    },
    {
        "id": "ONNXCLP006",
        "name": "model-unverified",
        "level": "error",
        "security_severity": "7.0",
        "precision": "very-high",
        "tags": ["security", "backdoor", "onnx", "ml-model", "coverage"],
        "short": "No detector could examine the model",
        "full": (
            "The model was read and its layers scored, but none of the selected model-level detectors could "
            "examine it (for example no classifier layer the weight-only detector can read): its verdict is "
            "unverified, not clean. `onnxclp scan --fail-on suspicious` fails on it (exit 6) unless "
            "--allow-unverified."
        ),
        "help": (
            "The message holds each detector's reason. Scan the model with a detector that reads it (--detector "
            "mmbd runs the model and needs only a classifier output), check it by other means, or accept it "
            "explicitly with --allow-unverified (the result then has level warning)."
        ),
    },
)

_RULE_INDEX = {rule["name"]: i for i, rule in enumerate(RULES)}


def rule_table() -> list[tuple[str, str, str, str]]:
    """Return ``(ruleId, name, level, security-severity or "-")`` for each rule, for docs and tests."""
    return [(r["id"], r["name"], r["level"], r["security_severity"] or "-") for r in RULES]


def _descriptor(rule: Mapping[str, Any], help_uri: str | None) -> dict[str, Any]:
    """Build a SARIF ``reportingDescriptor`` for one rule."""
    props: dict[str, Any] = {"tags": list(rule["tags"]), "precision": rule["precision"]}
    if rule["security_severity"] is not None:
        props["security-severity"] = rule["security_severity"]
    descriptor: dict[str, Any] = {
        "id": rule["id"],
        "name": rule["name"],
        "shortDescription": {"text": rule["short"]},
        "fullDescription": {"text": rule["full"]},
        "help": {
            "text": rule["help"],
            "markdown": f"**{rule['short']}** ({rule['id']}, `{rule['name']}`)\n\n{rule['help']}",
        },
        "defaultConfiguration": {"level": rule["level"]},
        "properties": props,
    }
    if help_uri:
        descriptor["helpUri"] = help_uri
    return descriptor


def _json_safe(value: Any) -> Any:
    """Copy ``value`` with non-finite floats replaced by ``None`` (NaN/Infinity are not JSON) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    # numpy scalars and the like: keep the number, never the object
    try:
        return _json_safe(float(value))
    except (TypeError, ValueError):
        return str(value)


def _fmt(value: Any) -> str:
    """Format a number for a message: 4 significant digits, ``n/a`` when missing or not finite."""
    if isinstance(value, bool) or value is None:
        return "n/a"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.4g}" if math.isfinite(number) else "n/a"


def _fingerprint(rule_id: str, rel_path: str, node: str = "", channel: int | str = "") -> str:
    """Stable identity of a finding: SHA-256 over rule, path, node and channel (never over scores)."""
    key = "\x00".join((rule_id, rel_path, node, str(channel)))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _location_parts(path: str, base: Path | None) -> tuple[dict[str, Any], str]:
    """Return the SARIF ``artifactLocation`` for ``path`` and the path text used in fingerprints.

    A path under ``base`` (or any relative path when there is no base) becomes a percent-encoded relative
    URI with ``uriBaseId`` ``%SRCROOT%``; anything else becomes an absolute ``file://`` URI.
    """
    rel: str | None = None
    if base is not None:
        absolute = Path(os.path.abspath(path))
        try:
            candidate = PurePath(os.path.relpath(absolute, base)).as_posix()
        except ValueError:  # another drive on Windows
            candidate = None
        if candidate is not None and candidate != ".." and not candidate.startswith("../"):
            rel = candidate
    elif not os.path.isabs(path):
        rel = PurePath(os.path.normpath(path)).as_posix()
        if rel == ".." or rel.startswith("../"):
            rel = None
    if rel is not None:
        return {"uri": quote(rel, safe="/"), "uriBaseId": SRCROOT}, rel
    absolute = Path(os.path.abspath(path))
    return {"uri": absolute.as_uri()}, absolute.as_posix()


def _layer_location(artifact: Mapping[str, Any], node: str, channel: int | None = None) -> dict[str, Any]:
    """A location in the model file with a logical location naming the graph node (and channel)."""
    logical: dict[str, Any] = {"name": node, "kind": "function"}
    logical["fullyQualifiedName"] = f"{node}[{channel}]" if channel is not None else node
    return {"physicalLocation": {"artifactLocation": dict(artifact)}, "logicalLocations": [logical]}


def _model_location(artifact: Mapping[str, Any]) -> dict[str, Any]:
    """A location naming the whole model file."""
    return {"physicalLocation": {"artifactLocation": dict(artifact)}}


def _result(
    rule_name: str,
    message: str,
    locations: list[dict[str, Any]],
    fingerprint: str,
    properties: Mapping[str, Any],
    level: str | None = None,
) -> dict[str, Any]:
    """Assemble one SARIF ``result``."""
    index = _RULE_INDEX[rule_name]
    rule = RULES[index]
    return {
        "ruleId": rule["id"],
        "ruleIndex": index,
        "level": level or rule["level"],
        "message": {"text": message},
        "locations": locations,
        "partialFingerprints": {FINGERPRINT_KEY: fingerprint},
        "properties": _json_safe(dict(properties)),
    }


def _detector_summary(detectors: Mapping[str, Any]) -> str:
    """One clause per detector that votes suspicious: name, statistic, p-value, threshold."""
    parts = []
    for name, det in sorted(detectors.items()):
        if not isinstance(det, Mapping) or not det.get("suspicious"):
            continue
        text = f"{name} (statistic {_fmt(det.get('statistic'))}"
        if det.get("p_value") is not None:
            text += f", p = {_fmt(det.get('p_value'))}"
        text += f", threshold {_fmt(det.get('threshold'))})"
        if det.get("detail"):
            text += f": {det['detail']}"
        parts.append(text)
    return "; ".join(parts)


SANITIZED = "sanitized"  # the verdict field of a ``sanitize --report-format sarif`` entry: no detector ran


def _channel_message(layer: Mapping[str, Any], channel: int, verdict: str) -> tuple[str, dict[str, Any]]:
    """Message and properties of one flagged channel."""
    node = str(layer.get("node") or layer.get("weight") or "?")
    scores = layer.get("scores") or []
    score = scores[channel] if isinstance(channel, int) and 0 <= channel < len(scores) else None
    threshold = layer.get("threshold")
    lower = layer.get("lower_threshold")
    mean, std = layer.get("score_mean"), layer.get("score_std")
    z = None
    try:
        if score is not None and mean is not None and std:
            z = (float(score) - float(mean)) / float(std)
    except (TypeError, ValueError, ZeroDivisionError):
        z = None
    if score is not None and lower is not None and threshold is not None and float(score) < float(lower):
        where = f"below the lower threshold {_fmt(lower)}"
    else:
        where = f"above the threshold {_fmt(threshold)}"
    message = (
        f"Channel {channel} of layer '{node}' ({layer.get('op', '?')}, weight '{layer.get('weight', '?')}') "
        f"has score {_fmt(score)}, {where}"
    )
    if z is not None:
        message += f" (z = {_fmt(z)})"
    message += "; `onnxclp sanitize` pruned it." if verdict == SANITIZED else "; `onnxclp sanitize` would prune it."
    if verdict == "clean":
        message += " The model's verdict is clean: on its own this outlier is weak evidence."
    elif verdict == "unverified":
        message += " No model-level detector could examine this model: its verdict is unverified."
    props = {
        "channel": channel,
        "score": score,
        "threshold": threshold,
        "lowerThreshold": lower,
        "zScore": z,
        "layerMean": mean,
        "layerStd": std,
        "layerChannels": layer.get("channels"),
        "weight": layer.get("weight"),
        "op": layer.get("op"),
        "scoreKind": layer.get("score"),
        "modelVerdict": verdict,
    }
    return message, props


def _model_results(
    entry: Mapping[str, Any], base: Path | None, unverified_level: str = "error"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """SARIF artifact and results for one model entry of the ``scan --format json`` list."""
    path = str(entry.get("path") or "")
    artifact_location, rel = _location_parts(path, base)
    verdict = str(entry.get("verdict") or "error")
    target = entry.get("target")
    detectors = entry.get("detectors") or {}
    report = entry.get("report")
    results: list[dict[str, Any]] = []

    if verdict == "error" or entry.get("error"):
        reason = str(entry.get("error") or "unknown error")
        results.append(
            _result(
                "scan-error",
                f"Model '{rel}' could not be scanned: {reason}",
                [_model_location(artifact_location)],
                _fingerprint(RULES[_RULE_INDEX["scan-error"]]["id"], rel),
                {"verdict": verdict, "error": reason},
            )
        )

    if verdict == "suspicious":
        summary = _detector_summary(detectors)
        message = f"Model '{rel}' is suspicious of a backdoor"
        if target is not None:
            message += f" (suspected target class {target})"
        message += f": {summary}." if summary else "."
        results.append(
            _result(
                "model-suspicious",
                message,
                [_model_location(artifact_location)],
                _fingerprint(RULES[_RULE_INDEX["model-suspicious"]]["id"], rel),
                {"verdict": verdict, "target": target, "detectors": detectors},
            )
        )

    if verdict == "unverified":
        skipped_detectors = entry.get("detectors_skipped") or {}
        reasons = "; ".join(f"{n}: {why}" for n, why in sorted(skipped_detectors.items()))
        message = f"Model '{rel}' is unverified: no selected detector could examine it" + (
            f" ({reasons})." if reasons else "."
        )
        message += (
            " It fails `--fail-on suspicious` (exit 6) unless --allow-unverified."
            if unverified_level == "error"
            else " It was accepted (--allow-unverified or a --fail-on that ignores verdicts)."
        )
        results.append(
            _result(
                "model-unverified",
                message,
                [_model_location(artifact_location)],
                _fingerprint(RULES[_RULE_INDEX["model-unverified"]]["id"], rel),
                {"verdict": verdict, "detectorsSkipped": dict(skipped_detectors)},
                level=unverified_level,
            )
        )

    if isinstance(report, Mapping):
        layers = [layer for layer in report.get("layers") or [] if isinstance(layer, Mapping)]
        rule_outlier = RULES[_RULE_INDEX["channel-outlier"]]["id"]
        for layer in layers:
            node = str(layer.get("node") or layer.get("weight") or "")
            for channel in layer.get("pruned") or []:
                message, props = _channel_message(layer, channel, verdict)
                results.append(
                    _result(
                        "channel-outlier",
                        message,
                        [_layer_location(artifact_location, node, channel)],
                        _fingerprint(rule_outlier, rel, node, channel),
                        props,
                        level="warning" if verdict in ("suspicious", "unverified") else "note",
                    )
                )
        rule_skipped = RULES[_RULE_INDEX["layer-skipped"]]["id"]
        skipped = [s for s in report.get("skipped") or [] if isinstance(s, Mapping)]
        for skip in skipped:
            node = str(skip.get("node") or skip.get("weight") or "")
            reason = str(skip.get("reason") or "no reason given")
            results.append(
                _result(
                    "layer-skipped",
                    f"Layer '{node}' ({skip.get('op', '?')}) was not scored: {reason}",
                    [_layer_location(artifact_location, node)],
                    _fingerprint(rule_skipped, rel, node),
                    {"reason": reason, "op": skip.get("op"), "weight": skip.get("weight")},
                )
            )
        if not layers and verdict != "error":
            results.append(
                _result(
                    "nothing-scored",
                    f"Model '{rel}' has no scorable layer ({len(skipped)} skipped): its verdict says nothing about backdoors.",
                    [_model_location(artifact_location)],
                    _fingerprint(RULES[_RULE_INDEX["nothing-scored"]]["id"], rel),
                    {"verdict": verdict, "skippedLayers": len(skipped)},
                )
            )

    artifact_props: dict[str, Any] = {"verdict": verdict, "target": target}
    if isinstance(report, Mapping):
        artifact_props["method"] = report.get("method")
        totals = report.get("totals")
        if isinstance(totals, Mapping):
            artifact_props["totals"] = totals
    if detectors:
        artifact_props["detectors"] = detectors
    if entry.get("detectors_skipped"):
        artifact_props["detectorsSkipped"] = entry.get("detectors_skipped")
    artifact = {
        "location": dict(artifact_location),
        "roles": ["analysisTarget"],
        "properties": _json_safe(artifact_props),
    }
    return artifact, results


def _default_information_uri() -> str | None:
    """The project's home page from the installed package metadata (``[project.urls]``), if any."""
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        meta = metadata("onnxclp")
    except (ImportError, PackageNotFoundError):
        return None
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        if label.strip().lower() in {"homepage", "home", "repository", "source", "documentation"} and url.strip():
            return url.strip()
    home = meta.get("Home-page")
    return home.strip() if home and home.strip() and home.strip().upper() != "UNKNOWN" else None


def to_sarif(
    results: Iterable[Mapping[str, Any]],
    *,
    tool_version: str,
    base_dir: str | os.PathLike[str] | None = None,
    information_uri: str | None = None,
    fail_on: str | None = None,
    allow_unverified: bool = False,
) -> dict[str, Any]:
    """Convert ``scan --format json`` results (one dict per model) into a SARIF 2.1.0 log.

    Args:
        results: the per-model objects (``path``, ``verdict``, ``target``, ``error``, ``detectors``, ``report``).
        tool_version: onnxclp's version, written to ``tool.driver.version``.
        base_dir: the source root (a checkout): model paths under it are written relative to it with
            ``uriBaseId`` ``%SRCROOT%`` (and ``originalUriBaseIds`` maps ``%SRCROOT%`` to it); paths outside it
            become absolute ``file://`` URIs. Relative model paths are resolved against the current directory.
            Without ``base_dir`` relative paths are kept relative (to ``%SRCROOT%``, left unresolved).
        information_uri: ``tool.driver.informationUri``; by default the ``[project.urls]`` home page of the
            installed package, omitted when there is none.
        fail_on, allow_unverified: the gate (``scan --fail-on``, ``--allow-unverified``): a ``model-unverified``
            result has level ``error`` unless the gate lets it pass (``allow_unverified``, or ``fail_on``
            ``outliers`` or ``never``), then ``warning``.

    Returns:
        A JSON-serialisable dict (no NaN or infinity) valid against the SARIF 2.1.0 schema.
    """
    base = Path(os.path.abspath(os.fspath(base_dir))) if base_dir is not None else None
    uri = information_uri if information_uri is not None else _default_information_uri()
    help_uri = f"{uri.rstrip('/')}/blob/main/{_DOCS}" if uri and "github.com/" in uri else None

    driver: dict[str, Any] = {
        "name": "onnxclp",
        "fullName": "onnxclp: data-free backdoor detection and removal for ONNX models",
        "version": str(tool_version),
        "rules": [_descriptor(rule, help_uri) for rule in RULES],
    }
    if uri:
        driver["informationUri"] = uri
    if _SEMVER.fullmatch(str(tool_version)):
        driver["semanticVersion"] = str(tool_version)

    artifacts: list[dict[str, Any]] = []
    sarif_results: list[dict[str, Any]] = []
    notifications: list[dict[str, Any]] = []
    passes = allow_unverified or fail_on in ("outliers", "never")
    for entry in results:
        artifact, model_results = _model_results(entry, base, "warning" if passes else "error")
        index = len(artifacts)
        artifacts.append(artifact)
        for res in model_results:
            for loc in res["locations"]:
                loc["physicalLocation"]["artifactLocation"]["index"] = index
            sarif_results.append(res)
            if res["ruleId"] == RULES[_RULE_INDEX["scan-error"]]["id"]:
                notifications.append(
                    {
                        "level": "error",
                        "message": dict(res["message"]),
                        "locations": [dict(res["locations"][0])],
                        "descriptor": {"id": res["ruleId"], "index": res["ruleIndex"]},
                    }
                )

    invocation: dict[str, Any] = {"executionSuccessful": True}
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run: dict[str, Any] = {
        "tool": {"driver": driver},
        "invocations": [invocation],
        "artifacts": artifacts,
        "results": sarif_results,
    }
    if base is not None:
        root = base.as_uri()
        run["originalUriBaseIds"] = {SRCROOT: {"uri": root if root.endswith("/") else root + "/"}}
    return {"$schema": SARIF_SCHEMA_URI, "version": SARIF_VERSION, "runs": [run]}
