"""SARIF 2.1.0 output (onnxclp.sarif): schema validity against the vendored official schema, rule mapping,
locations and fingerprints. The model entries are built here in the shape ``scan --format json`` prints."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema")

from onnxclp.sarif import FINGERPRINT_KEY, RULES, SRCROOT, rule_table, to_sarif  # noqa: E402

SCHEMA_PATH = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"


@pytest.fixture(scope="module")
def validator() -> Any:
    """A draft-04 validator for the official SARIF 2.1.0 schema."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)


def check(validator: Any, log: dict[str, Any]) -> dict[str, Any]:
    """Validate ``log`` (after a strict JSON round trip: no NaN) and return the round-tripped log."""
    text = json.dumps(log, allow_nan=False)
    parsed = json.loads(text)
    errors = sorted(validator.iter_errors(parsed), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])
    return parsed


def layer(node: str, scores: list[float], pruned: list[int], threshold: float = 3.0, op: str = "Conv") -> dict:
    """A per-layer report entry as ``Report`` writes it."""
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return {
        "node": node,
        "op": op,
        "weight": f"{node}.weight",
        "channels": len(scores),
        "affine": None,
        "role": "hidden",
        "score": "spectral",
        "scores": scores,
        "score_min": min(scores),
        "score_mean": mean,
        "score_max": max(scores),
        "score_std": std,
        "threshold": threshold,
        "lower_threshold": None,
        "rescale_from": None,
        "pruned": pruned,
        "rescaled": {},
        "topk_target": None,
        "topk_zeroed": [],
        "note": None,
    }


def report(layers: list[dict], skipped: list[dict] | None = None) -> dict:
    """A per-model report (the ``report`` member of a scan entry)."""
    return {
        "method": "clp",
        "params": {"method": "clp", "u": 3.0},
        "layers": layers,
        "skipped": skipped or [],
        "input": "x.onnx",
        "totals": {"scored_layers": len(layers), "skipped_layers": len(skipped or [])},
        "version": "0.1.0",
    }


FC_SKIP = {
    "node": "/fc/Gemm",
    "op": "Gemm",
    "reason": "fully connected: not scored by CLP (use --include-fc)",
    "weight": "fc.weight",
}


def entry(
    path: str, verdict: str, rep: dict | None, *, target: int | None = None, error: str | None = None, stat: float = 0.5
) -> dict:
    """One model's object in the ``scan --format json`` list."""
    suspicious = verdict == "suspicious"
    detectors = (
        {}
        if verdict == "error"
        else {
            "zscore-tail": {
                "statistic": stat,
                "p_value": 0.01 if suspicious else 0.4,
                "threshold": 0.05,
                "suspicious": suspicious,
                "target": target,
                "detail": "max channel z across layers",
            },
            "classifier-weights": {
                "statistic": 1.2,
                "p_value": None,
                "threshold": 2.0,
                "suspicious": False,
                "target": None,
                "detail": "",
            },
        }
    )
    return {"path": path, "verdict": verdict, "target": target, "error": error, "detectors": detectors, "report": rep}


def clean_entry(path: str = "models/clean.onnx") -> dict:
    """A clean model with one (weak) outlier channel and a skipped FC layer."""
    return entry(
        path,
        "clean",
        report([layer("/conv1/Conv", [1.0, 1.1, 0.9, 1.0], []), layer("/conv2/Conv", [1, 1, 1, 5.0], [3])], [FC_SKIP]),
    )


def suspicious_entry(path: str = "models/badnet.onnx", scale: float = 1.0) -> dict:
    """A suspicious model with three outlier channels in two layers; ``scale`` changes every score."""
    layers = [
        layer("/layer1/conv/Conv", [scale * s for s in (1.0, 9.0, 1.1, 8.5, 0.9)], [1, 3], threshold=3.0 * scale),
        layer("/layer2/conv/Conv", [scale * s for s in (1.0, 1.0, 1.0, 1.0, 1.0, 7.0)], [5], threshold=2.5 * scale),
    ]
    return entry(path, "suspicious", report(layers, [FC_SKIP]), target=7, stat=4.2 * scale)


def error_entry(path: str = "models/broken.onnx") -> dict:
    """A model that could not be read."""
    return entry(path, "error", None, error="not an ONNX model: Error parsing message")


def results_of(log: dict, rule_id: str) -> list[dict]:
    """The run's results with ``rule_id``."""
    return [r for r in log["runs"][0]["results"] if r["ruleId"] == rule_id]


def test_rules_are_stable() -> None:
    """Rule ids and names are an interface (code-scanning alerts and suppressions key on them): never renumber."""
    assert rule_table() == [
        ("ONNXCLP001", "model-suspicious", "error", "8.0"),
        ("ONNXCLP002", "channel-outlier", "warning", "5.0"),
        ("ONNXCLP003", "scan-error", "error", "7.0"),
        ("ONNXCLP004", "layer-skipped", "note", "-"),
        ("ONNXCLP005", "nothing-scored", "warning", "4.0"),
        ("ONNXCLP006", "model-unverified", "error", "7.0"),
    ]
    assert len({r["id"] for r in RULES}) == len(RULES)


def test_driver_and_rules(validator: Any) -> None:
    """tool.driver names onnxclp, its version, and describes every rule with help and security-severity."""
    log = check(validator, to_sarif([], tool_version="1.2.3", information_uri="https://github.com/example/onnxclp"))
    assert log["version"] == "2.1.0"
    driver = log["runs"][0]["tool"]["driver"]
    assert driver["name"] == "onnxclp"
    assert driver["version"] == driver["semanticVersion"] == "1.2.3"
    assert driver["informationUri"] == "https://github.com/example/onnxclp"
    assert [r["id"] for r in driver["rules"]] == [r["id"] for r in RULES]
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"] and rule["fullDescription"]["text"] and rule["help"]["text"]
        assert rule["helpUri"] == "https://github.com/example/onnxclp/blob/main/docs/ci.md"
        assert rule["properties"]["tags"]
    severities = {r["id"]: r["properties"].get("security-severity") for r in driver["rules"]}
    assert severities == {
        "ONNXCLP001": "8.0",
        "ONNXCLP002": "5.0",
        "ONNXCLP003": "7.0",
        "ONNXCLP004": None,
        "ONNXCLP005": "4.0",
        "ONNXCLP006": "7.0",
    }
    assert log["runs"][0]["results"] == []


def test_clean_model(validator: Any) -> None:
    """A clean model: no ONNXCLP001; its outlier is a note, its skipped FC layer a note; listed as an artifact."""
    log = check(validator, to_sarif([clean_entry()], tool_version="0.1.0"))
    run = log["runs"][0]
    assert not results_of(log, "ONNXCLP001")
    [outlier] = results_of(log, "ONNXCLP002")
    assert outlier["level"] == "note"
    assert "verdict is clean" in outlier["message"]["text"]
    [skipped] = results_of(log, "ONNXCLP004")
    assert skipped["level"] == "note"
    assert {r["level"] for r in run["results"]} == {"note"}
    [artifact] = run["artifacts"]
    assert artifact["location"] == {"uri": "models/clean.onnx", "uriBaseId": SRCROOT}
    assert artifact["properties"]["verdict"] == "clean"


def test_suspicious_model_with_outliers(validator: Any) -> None:
    """One high-severity model result naming the target and the detector; one warning per flagged channel."""
    log = check(validator, to_sarif([suspicious_entry()], tool_version="0.1.0"))
    [model] = results_of(log, "ONNXCLP001")
    assert model["level"] == "error"
    assert "target class 7" in model["message"]["text"]
    assert "zscore-tail" in model["message"]["text"] and "classifier-weights" not in model["message"]["text"]
    assert model["properties"]["target"] == 7
    assert model["properties"]["detectors"]["zscore-tail"]["p_value"] == 0.01
    assert "logicalLocations" not in model["locations"][0]

    outliers = results_of(log, "ONNXCLP002")
    assert [(r["locations"][0]["logicalLocations"][0]["name"], r["properties"]["channel"]) for r in outliers] == [
        ("/layer1/conv/Conv", 1),
        ("/layer1/conv/Conv", 3),
        ("/layer2/conv/Conv", 5),
    ]
    first = outliers[0]
    assert first["level"] == "warning"
    assert first["properties"]["score"] == 9.0 and first["properties"]["threshold"] == 3.0
    assert first["properties"]["zScore"] > 1
    assert first["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == "/layer1/conv/Conv[1]"
    assert "Channel 1 of layer '/layer1/conv/Conv'" in first["message"]["text"]
    for res in log["runs"][0]["results"]:
        loc = res["locations"][0]["physicalLocation"]["artifactLocation"]
        assert loc == {"uri": "models/badnet.onnx", "uriBaseId": SRCROOT, "index": 0}
        assert len(res["partialFingerprints"][FINGERPRINT_KEY]) == 64


def test_error_entry(validator: Any) -> None:
    """A model that cannot be read: an error result, a tool notification, an artifact with verdict error."""
    log = check(validator, to_sarif([error_entry()], tool_version="0.1.0"))
    run = log["runs"][0]
    [res] = run["results"]
    assert res["ruleId"] == "ONNXCLP003" and res["level"] == "error"
    assert "Error parsing message" in res["message"]["text"]
    [note] = run["invocations"][0]["toolExecutionNotifications"]
    assert note["level"] == "error" and note["descriptor"]["id"] == "ONNXCLP003"
    assert run["artifacts"][0]["properties"]["verdict"] == "error"


def test_skipped_layers(validator: Any) -> None:
    """Each skipped layer is a note naming its node and the reason; no security-severity on that rule."""
    skipped = [FC_SKIP, {"node": "", "op": "MatMul", "reason": "no output-channel axis", "weight": "w.mm"}]
    log = check(
        validator,
        to_sarif([entry("m.onnx", "clean", report([layer("/c/Conv", [1.0, 1.0], [])], skipped))], tool_version="0.1.0"),
    )
    notes = results_of(log, "ONNXCLP004")
    assert [n["locations"][0]["logicalLocations"][0]["name"] for n in notes] == ["/fc/Gemm", "w.mm"]
    assert "use --include-fc" in notes[0]["message"]["text"]
    assert notes[1]["properties"]["reason"] == "no output-channel axis"
    assert all(n["level"] == "note" for n in notes)


def test_nothing_scored(validator: Any) -> None:
    """A model read without error but with no scored layer gets ONNXCLP005 (scan exits 3 for it)."""
    log = check(validator, to_sarif([entry("t.onnx", "clean", report([], [FC_SKIP]))], tool_version="0.1.0"))
    [res] = results_of(log, "ONNXCLP005")
    assert res["level"] == "warning"
    assert res["properties"]["skippedLayers"] == 1


def test_multiple_models(validator: Any) -> None:
    """Several models in one run: one artifact each, results pointing at the right artifact index."""
    entries = [clean_entry("a/clean.onnx"), suspicious_entry("b/bad.onnx"), error_entry("c/broken.onnx")]
    log = check(validator, to_sarif(entries, tool_version="0.1.0"))
    run = log["runs"][0]
    assert [a["location"]["uri"] for a in run["artifacts"]] == ["a/clean.onnx", "b/bad.onnx", "c/broken.onnx"]
    for res in run["results"]:
        loc = res["locations"][0]["physicalLocation"]["artifactLocation"]
        assert run["artifacts"][loc["index"]]["location"]["uri"] == loc["uri"]
    assert [
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results_of(log, "ONNXCLP001")
    ] == ["b/bad.onnx"]
    assert [
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results_of(log, "ONNXCLP003")
    ] == ["c/broken.onnx"]
    fingerprints = [r["partialFingerprints"][FINGERPRINT_KEY] for r in run["results"]]
    assert len(set(fingerprints)) == len(fingerprints)


def test_fingerprints_ignore_scores() -> None:
    """Re-runs match: fingerprints depend on rule, path, node and channel, not on scores, thresholds or p-values."""
    a = to_sarif([suspicious_entry(scale=1.0), clean_entry()], tool_version="0.1.0")
    b = to_sarif([suspicious_entry(scale=1.7), clean_entry()], tool_version="0.2.0")
    fa = [(r["ruleId"], r["partialFingerprints"]) for r in a["runs"][0]["results"]]
    fb = [(r["ruleId"], r["partialFingerprints"]) for r in b["runs"][0]["results"]]
    assert fa == fb
    assert a["runs"][0]["results"][0]["properties"] != b["runs"][0]["results"][0]["properties"]
    moved = to_sarif([suspicious_entry("models/other.onnx")], tool_version="0.1.0")
    assert {str(r["partialFingerprints"]) for r in moved["runs"][0]["results"]}.isdisjoint({str(f) for _, f in fa})


def test_base_dir_paths(validator: Any, tmp_path: Path) -> None:
    """Paths under base_dir become relative %SRCROOT% URIs (percent-encoded); outside it, absolute file URIs."""
    inside = tmp_path / "repo" / "my models" / "net#1.onnx"
    outside = tmp_path / "elsewhere" / "x.onnx"
    log = check(
        validator,
        to_sarif(
            [error_entry(str(inside)), error_entry(str(outside))], tool_version="0.1.0", base_dir=tmp_path / "repo"
        ),
    )
    run = log["runs"][0]
    assert run["originalUriBaseIds"][SRCROOT]["uri"] == (tmp_path / "repo").as_uri() + "/"
    first, second = (a["location"] for a in run["artifacts"])
    assert first == {"uri": "my%20models/net%231.onnx", "uriBaseId": SRCROOT}
    assert second == {"uri": outside.as_uri()}
    # the fingerprint uses the relative path, so the same checkout in another folder matches
    other = to_sarif(
        [error_entry(str(tmp_path / "clone" / "my models" / "net#1.onnx"))],
        tool_version="0.1.0",
        base_dir=tmp_path / "clone",
    )
    assert other["runs"][0]["results"][0]["partialFingerprints"] == run["results"][0]["partialFingerprints"]


def test_relative_paths_without_base_dir(validator: Any) -> None:
    """Without base_dir a relative path is normalised and kept relative; ``./`` does not change the fingerprint."""
    a = check(validator, to_sarif([error_entry("./models//m.onnx")], tool_version="0.1.0"))
    b = check(validator, to_sarif([error_entry("models/m.onnx")], tool_version="0.1.0"))
    assert a["runs"][0]["artifacts"][0]["location"] == {"uri": "models/m.onnx", "uriBaseId": SRCROOT}
    assert "originalUriBaseIds" not in a["runs"][0]
    assert a["runs"][0]["results"][0]["partialFingerprints"] == b["runs"][0]["results"][0]["partialFingerprints"]


def test_non_finite_numbers_are_json(validator: Any) -> None:
    """NaN and infinity (a degenerate layer, an undefined p-value) become null: SARIF must be strict JSON."""
    bad = suspicious_entry()
    bad["detectors"]["zscore-tail"]["statistic"] = float("nan")
    bad["report"]["layers"][0]["score_std"] = float("inf")
    log = check(validator, to_sarif([bad], tool_version="0.1.0"))
    [model] = results_of(log, "ONNXCLP001")
    assert model["properties"]["detectors"]["zscore-tail"]["statistic"] is None
    assert "statistic n/a" in model["message"]["text"]


def test_input_not_modified() -> None:
    """to_sarif does not mutate the scan results it is given."""
    entries = [suspicious_entry(), clean_entry(), error_entry()]
    before = copy.deepcopy(entries)
    to_sarif(entries, tool_version="0.1.0", base_dir=".")
    assert entries == before


def test_no_heavy_imports() -> None:
    """onnxclp.sarif pulls in neither torch nor onnxruntime (the CI step installs neither)."""
    code = "import sys, onnxclp.sarif; print(sorted(m for m in ('torch', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sanitize_report_as_sarif_is_not_a_scan_error(validator: Any, tmp_path: Path) -> None:
    """`sanitize --report-format sarif` (no detector runs): the pruned channels, said to be pruned, and no
    'could not be scanned' result."""
    repo = Path(__file__).resolve().parents[1]
    model, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.sarif"
    subprocess.run([sys.executable, str(repo / "examples" / "make_example_model.py"), str(model)], check=True,
                   capture_output=True)  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "onnxclp", "sanitize", str(model), str(out), "--report", str(rep),
                        "--report-format", "sarif", "-q"], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    log = check(validator, json.loads(rep.read_text()))
    results = log["runs"][0]["results"]
    assert not [x for x in results if x["ruleId"] == RULES[2]["id"]], results  # no scan-error
    pruned = [x for x in results if "pruned it." in x["message"]["text"]]
    assert pruned and all(x["properties"]["modelVerdict"] == "sanitized" for x in pruned)
    assert not log["runs"][0]["invocations"][0].get("toolExecutionNotifications")
