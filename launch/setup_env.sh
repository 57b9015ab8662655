#!/usr/bin/env bash
# Creates .venv (if missing) and installs warm-jax with the pinned lock file.
# Usage: bash launch/setup_env.sh        (idempotent; re-run after pulling)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip uv >/dev/null
.venv/bin/uv pip install -q --python .venv/bin/python -r requirements.lock
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e .
echo "environment ready: .venv ($(.venv/bin/python -c 'import jax; print("jax", jax.__version__)'))"
