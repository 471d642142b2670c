#!/usr/bin/env bash
# Run logic of the onnxclp GitHub Action (action.yml), kept in a script so it runs anywhere:
#
#   INPUT_MODELS='models/*.onnx zoo/' INPUT_FAIL_ON=suspicious bash ci/action-scan.sh
#
# Inputs (environment; action.yml maps its inputs onto them):
#   INPUT_MODELS            files, folders (recursive *.onnx) and globs, separated by spaces or newlines; required.
#                           Globs are passed to onnxclp unexpanded (it expands them); for a path with a space use a
#                           glob such as 'my?models/net.onnx'.
#   INPUT_METHOD            clp (default) or lpp
#   INPUT_DETECTOR          model-level detectors, separated by spaces, newlines or commas (default: onnxclp's
#                           default, the weight-only ones); each becomes one --detector
#   INPUT_FAIL_ON           suspicious (default) | outliers | never
#   INPUT_ALLOW_UNVERIFIED  true: a model no detector could examine passes --fail-on suspicious (default false)
#   INPUT_FPR               false-positive rate of the model-level verdict (default: onnxclp's, 0.01)
#   INPUT_SARIF             SARIF output path (default onnxclp.sarif); its folder is created
#   INPUT_EXTRA_ARGS        more `onnxclp scan` options, split on whitespace (no quoting)
#   INPUT_SUMMARY           true (default): the full text report in the log and the job summary; false: one line
#                           per model in the log (-q), no job summary
#   ONNXCLP                 the onnxclp command (default: onnxclp on PATH)
#
# One scan: it writes the SARIF file (--sarif) before it prints the text report, which ends with the tally
# (`3 models: 1 suspicious, 1 clean, 1 unverified, 0 errors`); the models that fail the gate are named after it.
# The script exits with the scan's exit code: 0 no model failed the gate, 1 a finding per --fail-on, 2 bad input or
# an unreadable model, 3 nothing scorable, 4 internal error, 6 a model no detector could examine (unverified) under
# --fail-on suspicious. Under GitHub Actions it also sets the outputs `exit-code` and `sarif` and adds the report to
# the job summary.
set -uo pipefail

models_text="${INPUT_MODELS:-}"
method="${INPUT_METHOD:-clp}"
detector_text="${INPUT_DETECTOR:-}"
fail_on="${INPUT_FAIL_ON:-suspicious}"
allow_unverified="${INPUT_ALLOW_UNVERIFIED:-false}"
fpr="${INPUT_FPR:-}"
sarif="${INPUT_SARIF:-onnxclp.sarif}"
extra_text="${INPUT_EXTRA_ARGS:-}"
summary="${INPUT_SUMMARY:-true}"
onnxclp_cmd="${ONNXCLP:-onnxclp}"

err() { if [[ -n "${GITHUB_ACTIONS:-}" ]]; then echo "::error title=onnxclp::$*"; else echo "onnxclp-action: error: $*" >&2; fi; }

# Word-split without pathname expansion: onnxclp expands globs itself (a pattern that matches nothing is an error
# entry there, not a literal file name here).
set -f
# shellcheck disable=SC2206  # splitting is intended; globbing is off
models=(${models_text})
# shellcheck disable=SC2206
extra=(${extra_text})
# shellcheck disable=SC2206
detectors=(${detector_text//,/ })
set +f

if [[ ${#models[@]} -eq 0 ]]; then
  err "input 'models' is empty: give files, folders or globs"
  exit 2
fi
case "$fail_on" in suspicious | outliers | never) ;; *)
  err "input 'fail-on' must be suspicious, outliers or never, not '$fail_on'"
  exit 2
  ;;
esac
case "$method" in clp | lpp) ;; *)
  err "input 'method' must be clp or lpp, not '$method'"
  exit 2
  ;;
esac
case "$allow_unverified" in true | false) ;; *)
  err "input 'allow-unverified' must be true or false, not '$allow_unverified'"
  exit 2
  ;;
esac
for d in "${detectors[@]}"; do
  if [[ ! "$d" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
    err "input 'detector' must be detector names (onnxclp scan --help), not '$d'"
    exit 2
  fi
done

mkdir -p -- "$(dirname -- "$sarif")"
rm -f -- "$sarif"
args=("${models[@]}" --method "$method" --fail-on "$fail_on")
[[ -n "$fpr" ]] && args+=(--fpr "$fpr")
for d in "${detectors[@]}"; do args+=(--detector "$d"); done
[[ "$allow_unverified" == "true" ]] && args+=(--allow-unverified)
args+=("${extra[@]}" --format text --output - --sarif "$sarif")
[[ "$summary" == "true" ]] || args+=(-q)

echo "onnxclp-action: $onnxclp_cmd scan ${args[*]}"
log_file="$(mktemp)"
"$onnxclp_cmd" scan "${args[@]}" 2>&1 | tee "$log_file"
rc=${PIPESTATUS[0]}

if [[ ! -s "$sarif" ]]; then
  # Keep the upload step meaningful: an empty run that says the tool failed, instead of a missing file.
  err "onnxclp exited $rc without writing $sarif; writing an empty SARIF log that records the failure"
  cat >"$sarif" <<JSON
{"\$schema": "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json",
 "version": "2.1.0",
 "runs": [{"tool": {"driver": {"name": "onnxclp"}},
           "invocations": [{"executionSuccessful": false, "exitCode": $rc,
                            "toolExecutionNotifications": [{"level": "error",
                              "message": {"text": "onnxclp scan exited $rc without writing SARIF; see the job log"}}]}],
           "results": []}]}
JSON
  [[ $rc -eq 0 ]] && rc=4
fi

if [[ "$summary" == "true" && -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
  {
    echo "### onnxclp scan (exit code $rc)"
    echo
    echo '```'
    cat "$log_file"
    echo '```'
  } >>"$GITHUB_STEP_SUMMARY"
fi
rm -f -- "$log_file"

if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
  {
    echo "exit-code=$rc"
    echo "sarif=$sarif"
  } >>"$GITHUB_OUTPUT"
fi

case $rc in
  0) echo "onnxclp-action: exit 0 (no model failed the gate: --fail-on $fail_on)" ;;
  1) err "a model failed the gate (--fail-on $fail_on); details in $sarif" ;;
  2) err "bad input or a model could not be read (exit 2)" ;;
  3) err "nothing scorable in a model (exit 3)" ;;
  6) err "a model could not be verified: no detector could examine it (exit 6; input allow-unverified accepts it)" ;;
  *) err "onnxclp failed (exit $rc)" ;;
esac
exit "$rc"
