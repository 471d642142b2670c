#!/usr/bin/env bash
# Run logic of the onnxclp GitHub Action (action.yml), kept in a script so it runs anywhere:
#
#   INPUT_MODELS='models/*.onnx zoo/' INPUT_FAIL_ON=suspicious bash ci/action-scan.sh
#
# Inputs (environment; action.yml maps its inputs onto them):
#   INPUT_MODELS      files, folders (recursive *.onnx) and globs, separated by spaces or newlines; required.
#                     Globs are passed to onnxclp unexpanded (it expands them); for a path with a space use a
#                     glob such as 'my?models/net.onnx'.
#   INPUT_METHOD      clp (default) or lpp
#   INPUT_FAIL_ON     suspicious (default) | outliers | never
#   INPUT_FPR         false-positive rate of the model-level verdict (default 0.05)
#   INPUT_SARIF       SARIF output path (default onnxclp.sarif); its folder is created
#   INPUT_EXTRA_ARGS  more `onnxclp scan` options, split on whitespace (no quoting)
#   INPUT_SUMMARY     true (default): also print a text summary to the log (a second, non-gating scan)
#   ONNXCLP           the onnxclp command (default: onnxclp on PATH)
#
# The SARIF file is written first (by the gating scan); the script then prints the summary and exits with the
# gating scan's exit code: 0 clean, 1 finding per --fail-on, 2 bad input or unreadable model, 3 nothing
# scorable, 4 internal error. Under GitHub Actions it also sets the outputs `exit-code` and `sarif` and adds
# the summary to the job summary.
set -uo pipefail

models_text="${INPUT_MODELS:-}"
method="${INPUT_METHOD:-clp}"
fail_on="${INPUT_FAIL_ON:-suspicious}"
fpr="${INPUT_FPR:-0.05}"
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

mkdir -p -- "$(dirname -- "$sarif")"
rm -f -- "$sarif"
common=("${models[@]}" --method "$method" --fail-on "$fail_on" --fpr "$fpr" "${extra[@]}")

echo "onnxclp-action: $onnxclp_cmd scan ${common[*]} --format sarif --output $sarif"
"$onnxclp_cmd" scan "${common[@]}" --format sarif --output "$sarif"
rc=$?

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

if [[ "$summary" == "true" ]]; then
  echo "onnxclp-action: summary"
  summary_file="$(mktemp)"
  # Not gating: its exit code is ignored; the gate is the scan above.
  "$onnxclp_cmd" scan "${common[@]}" --format text --output - >"$summary_file" 2>&1 || true
  cat "$summary_file"
  if [[ -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
    {
      echo "### onnxclp scan (exit code $rc)"
      echo
      echo '```'
      cat "$summary_file"
      echo '```'
    } >>"$GITHUB_STEP_SUMMARY"
  fi
  rm -f -- "$summary_file"
fi

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
  *) err "onnxclp failed (exit $rc)" ;;
esac
exit "$rc"
