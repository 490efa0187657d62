#!/usr/bin/env bash
# Create and fill .venv: torch==2.13.0 (the CPU wheel) first, then ckptwise with its extras.
# Idempotent: re-runs pip only when pyproject.toml changed since the last fill.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CKPTWISE_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ckptwise-setup"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: any other request for torch would pull several GB of CUDA wheels.
pip install "torch==2.13.0"
pip install -e ".[cli,config,plot,dev,s3,transformers,lightning,accelerate,deepspeed]"
echo "$want" > "$stamp"
