#!/usr/bin/env bash
# The test command: set up .venv, lint, type-check, run the test suite (fast, then slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CKPTWISE_VENV:-.venv}
export PYTHONHASHSEED=0 CUBLAS_WORKSPACE_CONFIG=:4096:8
"$VENV/bin/ruff" check src tests bench examples scripts
"$VENV/bin/ruff" format --check src tests bench examples scripts
"$VENV/bin/mypy" src tests examples scripts bench
run_pytest() {
  # pytest exits 5 when it collects no test: a failure here, never a pass.
  set +e
  "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests for: $*" >&2
    exit 1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
}
# Slow tests run in a second step, only when some exist (an empty step would end the log
# with "0 selected", which reads as a run of no tests).
slow=$("$VENV/bin/python" -m pytest -p no:cacheprovider --collect-only -q -m slow "$@" 2>/dev/null \
  | grep -c '::' || true)
run_pytest -m "not slow" "$@"
if [ "$slow" -gt 0 ] && [ -z "${CKPTWISE_SKIP_SLOW:-}" ]; then
  run_pytest -m slow "$@"
fi
# The Trainer integration once more, against transformers 4.51.2 (MiniCPM-V's pin).
if [ -z "${CKPTWISE_SKIP_TF4:-}" ]; then
  bash scripts/test-transformers4.sh
fi
