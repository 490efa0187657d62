#!/usr/bin/env bash
# The Trainer integration (DeepSpeed ZeRO-2/3 included) against transformers 4.51.2 (the version
# MiniCPM-V pins), in its own virtual environment (.venv-tf4): torch==2.13.0 first, then the
# 4.x stack, then ckptwise.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CKPTWISE_TF4_VENV:-.venv-tf4}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.ckptwise-setup"
want=$(sha256sum pyproject.toml scripts/test-transformers4.sh | sha256sum | cut -c1-16)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pip install "torch==2.13.0"
  pip install "transformers==4.51.2" "accelerate==1.7.0" "peft==0.15.2" \
    "pytest>=8" "pytest-timeout>=2.3" -e ".[cli,config,deepspeed]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider tests/integration/test_transformers.py \
  tests/integration/test_deepspeed.py "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests under transformers 4.51.2" >&2
  exit 1
fi
exit "$rc"
