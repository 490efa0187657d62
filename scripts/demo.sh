#!/usr/bin/env bash
# The main job: set up .venv, then run a small real fine-tune that shows the policies working.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${CKPTWISE_VENV:-.venv}
exec "$VENV/bin/python" examples/demo.py "$@"
