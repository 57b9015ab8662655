#!/usr/bin/env bash
# The whole WARM flow on the bundled miniature TL;DR world, on CPU, from a fresh clone:
# sets up .venv (launch/setup_env.sh), then runs every stage of gin/runs/warm_mini.gin.
# Re-running continues where it stopped (finished stages are skipped).
#   RUN_DIR=runs/x GIN=gin/runs/paper_miniature.gin bash launch/local.sh [--gin.NAME=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
source launch/cpu_env.sh
RUN_DIR=${RUN_DIR:-runs/warm_mini}
GIN=${GIN:-gin/runs/warm_mini.gin}
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/python -m warm_jax.main --gin_file="$GIN" --gin.RUN_DIR="'$RUN_DIR'" "$@"
echo "report: $RUN_DIR/report.md"
