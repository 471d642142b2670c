"""CI packaging: the GitHub Action (action.yml + ci/action-scan.sh), the pre-commit hook and the CI examples.

The action's script is tested twice: against a stub ``onnxclp`` (its own logic: argument passing, one scan, exit
code kept, outputs, the fallback log) and against the real CLI on tests/golden/*.onnx (skipped while
``onnxclp scan`` has no ``--format``). The pre-commit hook is installed and run with ``pre-commit try-repo``, from
a copy of the working tree, on a commit that changes only a model's ``.onnx.data`` weights too.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "action-scan.sh"
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.onnx"))
SCHEMA_PATH = ROOT / "tests" / "data" / "sarif-schema-2.1.0.json"
ONNXCLP = shutil.which("onnxclp") or str(Path(sys.executable).with_name("onnxclp"))


def _scan_help() -> str:
    """``onnxclp scan --help`` of the installed CLI (empty when it cannot run)."""
    try:
        proc = subprocess.run(
            [ONNXCLP, "scan", "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout + proc.stderr


SCAN_HELP = _scan_help()
CLI_HAS_FORMAT = "--format" in SCAN_HELP and "--fail-on " in SCAN_HELP.replace("--fail-on-outliers", "")
needs_new_cli = pytest.mark.skipif(
    not CLI_HAS_FORMAT,
    reason="onnxclp scan has no --format/--fail-on yet (the multi-model CLI of issue 13 has not landed)",
)


def sarif_validator() -> Any:
    """A validator for the vendored SARIF 2.1.0 schema."""
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft4Validator(json.loads(SCHEMA_PATH.read_text(encoding="utf-8")))


def run_script(env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run ci/action-scan.sh with ``env`` added to a clean environment (no GitHub variables inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("INPUT_", "GITHUB_"))}
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


# --- action.yml --------------------------------------------------------------------------------------------------


def test_action_yml_structure() -> None:
    """A composite action with the documented inputs and defaults; inputs reach the script via env only."""
    action = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    assert action["name"] and action["description"]
    assert action["runs"]["using"] == "composite"
    inputs = action["inputs"]
    assert set(inputs) >= {"models", "method", "detector", "fail-on", "allow-unverified", "fpr", "sarif",
                           "python-version", "cache", "extra-args", "summary", "torch"}  # fmt: skip
    assert inputs["models"]["required"] is True
    defaults = {k: v.get("default") for k, v in inputs.items()}
    assert defaults["method"] == "clp" and defaults["fail-on"] == "suspicious"
    assert defaults["fpr"] == "" and defaults["sarif"] == "onnxclp.sarif"  # empty fpr: onnxclp's own default
    assert defaults["allow-unverified"] == "false" and defaults["detector"] == "" and defaults["cache"] == "true"
    assert all(v.get("description") for v in inputs.values())
    assert set(action["outputs"]) == {"exit-code", "sarif"}
    assert "6" in action["outputs"]["exit-code"]["description"]

    steps = action["runs"]["steps"]
    # the job's Python is left alone: setup-python does not put its interpreter on PATH
    [python] = [s for s in steps if str(s.get("uses", "")).startswith("actions/setup-python@")]
    assert python["with"]["update-environment"] is False
    [cache] = [s for s in steps if str(s.get("uses", "")).startswith("actions/cache@")]
    assert cache["if"] == "inputs.cache == 'true'" and cache["with"]["key"] == "${{ steps.env.outputs.key }}"
    run_steps = [s for s in steps if "run" in s]
    assert all(s.get("shell") == "bash" for s in run_steps), "composite run steps need an explicit shell"
    locate, install, scan, gate = run_steps
    assert steps.index(locate) < steps.index(cache) < steps.index(install)
    assert locate["id"] == "env" and "pyproject.toml" in locate["run"]
    assert install["env"]["ACTION_PATH"] == "${{ github.action_path }}" and "pip install" in install["run"]
    assert install["env"]["PIP_CACHE_DIR"] == "${{ steps.env.outputs.pip-cache }}"
    assert "onnxruntime" not in install["run"]
    # torch (for mmbd) only with the input torch, the CPU build on Linux, and before onnxclp
    assert defaults["torch"] == "true" and install["env"]["INPUT_TORCH"] == "${{ inputs.torch }}"
    run = install["run"]
    assert "download.pytorch.org/whl/cpu" in run and run.index("torch") < run.index('"$ACTION_PATH"')
    assert 'case "$INPUT_TORCH" in' in run and "exit 2" in run
    # one scan, which records the exit code and the outputs; the last step fails the action with that code
    assert scan["id"] == "scan" and "ci/action-scan.sh" in scan["run"] and scan["run"].endswith("|| true")
    assert gate["env"]["RC"] == "${{ steps.scan.outputs.exit-code }}" and gate["run"] == 'exit "${RC:-4}"'
    for step in run_steps:  # script injection: no expression inside the script text
        assert "${{" not in step["run"]
    mapped = {k: v for k, v in scan["env"].items() if k.startswith("INPUT_")}
    names = ["models", "method", "detector", "fail-on", "allow-unverified", "fpr", "sarif", "extra-args", "summary"]
    for name in names:
        assert mapped[f"INPUT_{name.upper().replace('-', '_')}"] == f"${{{{ inputs.{name} }}}}"


STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python: '-m venv DIR' makes DIR/bin/python (this stub); anything else is logged
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
echo "$*" >>"$STUB_LOG"
"""


@pytest.mark.parametrize(("torch", "runner_os"), [("true", "Linux"), ("true", "macOS"), ("false", "Linux")])
def test_action_install_step_installs_torch_as_asked(tmp_path: Path, torch: str, runner_os: str) -> None:
    """The install step's script, run with a stub python: torch's CPU build (Linux) and scipy before onnxclp
    with torch true, onnxclp alone with false."""
    action = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    install = next(s for s in action["runs"]["steps"] if s.get("name") == "Install onnxclp")
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": os.environ["PATH"], "PYTHON": str(stub), "RUNNER_TEMP": str(tmp_path), "RUNNER_OS": runner_os,
           "INPUT_TORCH": torch, "ACTION_PATH": "/the/action", "STUB_LOG": str(log)}  # fmt: skip
    proc = subprocess.run(["bash", "-c", install["run"]], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in log.read_text().splitlines() if " install " in line]  # not the import check
    assert lines[-1].endswith("install --disable-pip-version-check --quiet /the/action")
    if torch == "false":
        assert len(lines) == 1
    else:
        assert lines[0].endswith(" torch") and lines[1].endswith(" scipy")
        assert ("download.pytorch.org/whl/cpu" in lines[0]) == (runner_os == "Linux")


def test_action_install_step_refuses_a_bad_torch_input(tmp_path: Path) -> None:
    action = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    install = next(s for s in action["runs"]["steps"] if s.get("name") == "Install onnxclp")
    env = {"PATH": os.environ["PATH"], "PYTHON": "false", "RUNNER_TEMP": str(tmp_path), "INPUT_TORCH": "yes"}
    proc = subprocess.run(["bash", "-c", install["run"]], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "input 'torch' must be true or false" in proc.stdout
    assert not (tmp_path / "onnxclp-venv").exists()


def test_examples_parse() -> None:
    """The GitHub workflow uploads the SARIF even when the gate fails; GitLab keeps the reports as artifacts."""
    workflow = yaml.safe_load((ROOT / "docs" / "examples" / "github-workflow.yml").read_text(encoding="utf-8"))
    job = next(iter(workflow["jobs"].values()))
    assert job["permissions"]["security-events"] == "write"
    upload = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("github/codeql-action/upload-sarif@"))
    assert "always()" in upload["if"] and "steps.onnxclp.outputs.sarif" in upload["if"]
    assert upload["with"]["sarif_file"] == "${{ steps.onnxclp.outputs.sarif }}"  # the action's output, not a name
    assert "hashFiles" not in (ROOT / "docs" / "examples" / "github-workflow.yml").read_text(encoding="utf-8")

    gitlab = yaml.safe_load((ROOT / "docs" / "examples" / "gitlab-ci.yml").read_text(encoding="utf-8"))
    job = gitlab["onnxclp-scan"]
    assert job["artifacts"]["when"] == "always"
    assert {"onnxclp.sarif", "onnxclp.json"} <= set(job["artifacts"]["paths"])
    assert "reports" not in job["artifacts"], "reports:sast takes GitLab's schema, not SARIF (see docs/ci.md)"
    [scan] = [line for line in job["script"] if "onnxclp scan" in line]  # one scan writes both reports
    assert "--sarif onnxclp.sarif" in scan and "--json onnxclp.json" in scan


def test_ci_doc_matches_the_cli() -> None:
    """Issue 22.12: docs/ci.md does not call --fail-on suspicious the CLI's default, names no `sanitize --json`,
    and its JSON example has every field a scan entry has."""
    text = (ROOT / "docs" / "ci.md").read_text(encoding="utf-8")
    assert "sanitize --json" not in text
    assert "(the default;" not in text and "Without `--fail-on`, `scan` reports and exits 0" in text
    for field in ("exit_code", "detectors_skipped", "unverified"):
        assert f'"{field}"' in text or f"`{field}`" in text
    from onnxclp import scanning

    keys = set(scanning.error_entry("m.onnx", "x"))
    example = text[text.index("```json") : text.index("```", text.index("```json") + 7)]
    assert all(f'"{k}"' in example for k in keys)
    assert "| 6    |" in text


# --- ci/action-scan.sh against a stub onnxclp ---------------------------------------------------------------------

STUB = r"""#!/usr/bin/env bash
# stub onnxclp: records its arguments; writes a SARIF log for --sarif FILE, prints a text report; exits $STUB_RC
printf '%s\n' "---" "$@" >>"$STUB_LOG"
sarif=""
while [[ $# -gt 0 ]]; do
  case "$1" in --sarif) sarif="$2"; shift ;; esac
  shift
done
if [[ -n "$sarif" && -z "${STUB_NO_SARIF:-}" ]]; then
  printf '{"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "onnxclp"}}, "results": []}]}' >"$sarif"
fi
echo "2 models: 0 suspicious, 2 clean, 0 unverified, 0 errors"
echo "FAIL stub.onnx: suspicious" >&2
exit "${STUB_RC:-0}"
"""


@pytest.fixture
def stub(tmp_path: Path) -> dict[str, str]:
    """Environment that makes the script call the stub and write into tmp_path."""
    path = tmp_path / "onnxclp-stub"
    path.write_text(STUB, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    sarif = tmp_path / "out" / "scan.sarif"
    return {
        "ONNXCLP": str(path),
        "STUB_LOG": str(tmp_path / "calls.log"),
        "STUB_SARIF_CHECK": str(sarif),
        "INPUT_SARIF": str(sarif),
        "GITHUB_OUTPUT": str(tmp_path / "gh_output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "gh_summary"),
    }


def calls(env: dict[str, str]) -> list[list[str]]:
    """The stub's recorded argument lists."""
    text = Path(env["STUB_LOG"]).read_text(encoding="utf-8")
    return [chunk.strip("\n").split("\n") for chunk in text.split("---\n") if chunk.strip()]


@pytest.mark.parametrize("rc", [0, 1, 2, 3, 6])
def test_script_passes_inputs_and_keeps_exit_code(stub: dict[str, str], tmp_path: Path, rc: int) -> None:
    """Models split on spaces and newlines with globs unexpanded; options mapped; one scan writes the SARIF and the
    text report (stdout and stderr both reach the log and the job summary); exit code kept."""
    (tmp_path / "a.onnx").write_bytes(b"x")  # a glob that would match here must still reach onnxclp unexpanded
    env = {
        **stub,
        "STUB_RC": str(rc),
        "INPUT_MODELS": "*.onnx  models/\n  zoo/b.onnx\n",
        "INPUT_METHOD": "lpp",
        "INPUT_FAIL_ON": "outliers",
        "INPUT_FPR": "0.1",
        "INPUT_DETECTOR": "classifier, mmbd\n",
        "INPUT_ALLOW_UNVERIFIED": "true",
        "INPUT_EXTRA_ARGS": "--include-fc  --u 3.5",
    }
    proc = run_script(env, tmp_path)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    [gate] = calls(env)  # scanned once
    assert gate == [
        "scan", "*.onnx", "models/", "zoo/b.onnx", "--method", "lpp", "--fail-on", "outliers", "--fpr", "0.1",
        "--detector", "classifier", "--detector", "mmbd", "--allow-unverified", "--include-fc", "--u", "3.5",
        "--format", "text", "--output", "-", "--sarif", env["INPUT_SARIF"],
    ]  # fmt: skip
    assert "2 models: 0 suspicious" in proc.stdout and "FAIL stub.onnx" in proc.stdout
    outputs = Path(env["GITHUB_OUTPUT"]).read_text(encoding="utf-8")
    assert f"exit-code={rc}" in outputs and f"sarif={env['INPUT_SARIF']}" in outputs
    summary = Path(env["GITHUB_STEP_SUMMARY"]).read_text(encoding="utf-8")
    assert "2 models: 0 suspicious" in summary and "FAIL stub.onnx" in summary and f"exit code {rc}" in summary
    assert json.loads(Path(env["INPUT_SARIF"]).read_text(encoding="utf-8"))["version"] == "2.1.0"


def test_script_defaults_and_no_summary(stub: dict[str, str], tmp_path: Path) -> None:
    """Defaults: clp, --fail-on suspicious, onnxclp's own --fpr and detectors; summary=false: -q, no job summary."""
    env = {**stub, "INPUT_MODELS": "m.onnx", "INPUT_SUMMARY": "false"}
    proc = run_script(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    [gate] = calls(env)
    assert gate == ["scan", "m.onnx", "--method", "clp", "--fail-on", "suspicious", "--format", "text", "--output", "-",
                    "--sarif", env["INPUT_SARIF"], "-q"]  # fmt: skip
    assert not Path(env["GITHUB_STEP_SUMMARY"]).exists()


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"INPUT_MODELS": " \n "}, "'models' is empty"),
        ({"INPUT_MODELS": "m.onnx", "INPUT_FAIL_ON": "always"}, "'fail-on' must be"),
        ({"INPUT_MODELS": "m.onnx", "INPUT_METHOD": "abc"}, "'method' must be"),
        ({"INPUT_MODELS": "m.onnx", "INPUT_ALLOW_UNVERIFIED": "yes"}, "'allow-unverified' must be"),
        ({"INPUT_MODELS": "m.onnx", "INPUT_DETECTOR": "--output=x"}, "'detector' must be"),
    ],
)
def test_script_rejects_bad_inputs(stub: dict[str, str], tmp_path: Path, inputs: dict[str, str], message: str) -> None:
    """Bad inputs exit 2 before running onnxclp, as a GitHub error annotation under Actions."""
    proc = run_script({**stub, **inputs, "GITHUB_ACTIONS": "true"}, tmp_path)
    assert proc.returncode == 2
    assert "::error title=onnxclp::" in proc.stdout and message in proc.stdout
    assert not Path(stub["STUB_LOG"]).exists()


@pytest.mark.parametrize("rc", [0, 4])
def test_script_writes_fallback_sarif(stub: dict[str, str], tmp_path: Path, rc: int) -> None:
    """When onnxclp writes no SARIF (a crash), the script writes a valid log that records the failure, exits != 0."""
    env = {**stub, "INPUT_MODELS": "m.onnx", "STUB_RC": str(rc), "STUB_NO_SARIF": "1", "INPUT_SUMMARY": "false"}
    proc = run_script(env, tmp_path)
    assert proc.returncode == (4 if rc == 0 else rc)
    log = json.loads(Path(env["INPUT_SARIF"]).read_text(encoding="utf-8"))
    assert not list(sarif_validator().iter_errors(log))
    invocation = log["runs"][0]["invocations"][0]
    assert invocation["executionSuccessful"] is False and invocation["exitCode"] == rc


# --- ci/action-scan.sh against the real CLI -----------------------------------------------------------------------


@needs_new_cli
def test_script_on_golden_models(tmp_path: Path) -> None:
    """The action's script on tests/golden/*.onnx (a glob, as a workflow passes it): valid SARIF, one artifact per model."""
    sarif = tmp_path / "reports" / "onnxclp.sarif"
    env = {
        "ONNXCLP": ONNXCLP,
        "INPUT_MODELS": "tests/golden/*.onnx",
        "INPUT_SARIF": str(sarif),
        "INPUT_FAIL_ON": "suspicious",
    }
    proc = run_script(env, ROOT)
    assert proc.returncode in (0, 1, 6), proc.stdout + proc.stderr
    log = json.loads(sarif.read_text(encoding="utf-8"))
    errors = list(sarif_validator().iter_errors(log))
    assert not errors, errors[:3]
    run = log["runs"][0]
    assert run["tool"]["driver"]["name"] == "onnxclp"
    uris = sorted(a["location"]["uri"] for a in run.get("artifacts", []))
    assert len(uris) == len(GOLDEN) and all(u.endswith(".onnx") for u in uris)
    assert not [r for r in run["results"] if r["ruleId"] == "ONNXCLP003"], "a golden model failed to scan"
    suspicious = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in run["results"]
        if r["ruleId"] == "ONNXCLP001"
    }
    unverified = {
        r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        for r in run["results"]
        if r["ruleId"] == "ONNXCLP006"
    }
    assert "tests/golden/qdq.onnx" in unverified  # its Conv feeds the output: no classifier layer to read
    assert (proc.returncode == 1) == bool(suspicious)
    assert (proc.returncode == 6) == (not suspicious and bool(unverified))
    for model in GOLDEN:  # the text summary names every model in full, untruncated
        assert model.name in proc.stdout
    assert f"{len(GOLDEN)} models: " in proc.stdout  # the tally


@needs_new_cli
def test_script_error_entry_is_exit_2(tmp_path: Path) -> None:
    """An unreadable model among good ones: exit 2, its own ONNXCLP003 result, the good model still scanned."""
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    shutil.copy(GOLDEN[0], tmp_path / GOLDEN[0].name)
    if GOLDEN[0].with_suffix(".onnx.data").exists():
        shutil.copy(GOLDEN[0].with_suffix(".onnx.data"), tmp_path)
    sarif = tmp_path / "out.sarif"
    proc = run_script(
        {
            "ONNXCLP": ONNXCLP,
            "INPUT_MODELS": "broken.onnx " + GOLDEN[0].name,
            "INPUT_SARIF": str(sarif),
            "INPUT_SUMMARY": "false",
        },
        tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    log = json.loads(sarif.read_text(encoding="utf-8"))
    assert not list(sarif_validator().iter_errors(log))
    errors = [r for r in log["runs"][0]["results"] if r["ruleId"] == "ONNXCLP003"]
    assert [r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in errors] == ["broken.onnx"]
    assert len(log["runs"][0]["artifacts"]) == 2


# --- pre-commit -----------------------------------------------------------------------------------------------------


def test_pre_commit_manifest() -> None:
    """The hook manifest: id onnxclp-scan, python, .onnx files, the documented entry."""
    [hook] = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert hook["id"] == "onnxclp-scan"
    assert hook["language"] == "python"
    assert hook["entry"] == "onnxclp scan --fail-on suspicious"
    assert hook["files"] == r"\.onnx(\.data)?$"
    import re

    files = re.compile(hook["files"])
    assert files.search("m/model.onnx") and files.search("m/model.onnx.data") and not files.search("notes.txt")
    assert hook.get("pass_filenames", True) is True


def _git(cwd: Path, *args: str) -> None:
    """Run git quietly with a fixed identity."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True)


def _hook_repo(dest: Path) -> Path:
    """A git repository holding this working tree's package and hook manifest (tracked and untracked files, as
    they are now, so that uncommitted changes are what is tried), committed."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    keep = ("onnxclp/", "pyproject.toml", "README.md", ".pre-commit-hooks.yaml")
    for name in listed:
        if name.startswith(keep) and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "snapshot")
    return dest


@pytest.mark.slow
def test_pre_commit_try_repo(tmp_path: Path) -> None:
    """``pre-commit try-repo`` on a snapshot of this working tree: the hook installs (from PyPI) and scans a staged
    model, and a commit that changes only a model's ``.onnx.data`` weights (issue 22.14) scans that model.

    Slow (builds a virtual environment and installs onnx, numpy, typer and rich from PyPI: about a minute).
    Skipped when pre-commit is missing.
    """
    pre_commit = shutil.which("pre-commit") or str(Path(sys.executable).with_name("pre-commit"))
    if not Path(pre_commit).exists():
        pytest.skip("pre-commit is not installed (pip install -e .[test])")
    hook_repo = _hook_repo(tmp_path / "hook-repo")
    target = tmp_path / "target"
    target.mkdir()
    _git(target, "init", "-q")
    shutil.copy(ROOT / "tests" / "golden" / "vgg.torchscript.onnx", target / "model.onnx")
    (target / "notes.txt").write_text("not a model\n", encoding="utf-8")
    _git(target, "add", "model.onnx", "notes.txt")
    env = {**os.environ, "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    def try_repo(*files: str) -> tuple[int, str]:
        args = ["--files", *files] if files else []  # no files: the staged ones, as at commit time
        proc = subprocess.run(
            [pre_commit, "try-repo", str(hook_repo), "onnxclp-scan", *args, "--verbose"],
            cwd=target, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr

    def direct(model: str) -> int:
        proc = subprocess.run([ONNXCLP, "scan", "--fail-on", "suspicious", model], cwd=target, capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode in (0, 1, 6), proc.stdout + proc.stderr
        return proc.returncode

    rc, out = try_repo("model.onnx", "notes.txt")
    assert "onnxclp-scan" in out, out
    # the hook gives the verdict the CLI gives on the same file (the golden VGG has random weights, no backdoor)
    assert rc == direct("model.onnx"), out
    assert ("Passed" in out) == (rc == 0), out

    # a model with external weights, committed; then a commit that changes only its weights
    shutil.copy(ROOT / "tests" / "golden" / "resnet.dynamo.onnx", target / "net.onnx")
    data = (ROOT / "tests" / "golden" / "resnet.dynamo.onnx.data").read_bytes()
    model = onnx_load_with_location(target / "net.onnx", "resnet.dynamo.onnx.data", "net.onnx.data", data)
    _git(target, "add", "-A")
    _git(target, "commit", "-q", "-m", "models")
    raw = bytearray((target / "net.onnx.data").read_bytes())
    raw[:4] = raw[4:8]  # a changed weight
    (target / "net.onnx.data").write_bytes(bytes(raw))
    _git(target, "add", "net.onnx.data")
    rc, out = try_repo()
    assert "no files to check" not in out, out  # the weights-only commit is checked...
    assert "net.onnx: " in out, out  # the hook scanned net.onnx (its text report)
    assert rc == direct(model), out  # ...as the model it belongs to


def onnx_load_with_location(path: Path, old: str, new: str, data: bytes) -> str:
    """Point ``path``'s external tensors from ``old`` to ``new`` (written with ``data``); returns the model path."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for tensor in m.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(m, str(path))
    (path.parent / new).write_bytes(data)
    return path.name
