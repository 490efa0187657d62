#!/usr/bin/env bash
# A virtual environment with transformers 4.51.2 (the version MiniCPM-V pins) and ckptwise:
# torch==2.13.0 first, then the 4.x stack (accelerate 1.7.0, peft 0.15.2), then ckptwise with
# its cli, config and deepspeed extras (and pytest). Made once in .venv-tf4 (CKPTWISE_TF4_VENV to choose),
# refreshed when pyproject.toml or this script change; prints the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CKPTWISE_TF4_VENV:-.venv-tf4}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.ckptwise-setup"
want=$(sha256sum pyproject.toml scripts/venv-transformers4.sh | sha256sum | cut -c1-16)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >&2; }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip install "torch==2.13.0"
  pip install "transformers==4.51.2" "accelerate==1.7.0" "peft==0.15.2" \
    "pytest>=8" "pytest-timeout>=2.3" -e ".[cli,config,deepspeed]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)" >&2
echo "$VENV"
