#!/usr/bin/env bash
# One run file over several seeds, then the aggregate (mean +- std, claims held in k/n seeds):
#   SEEDS="0 1 2" GIN=gin/runs/paper_miniature.gin RUNS=runs/paper_miniature \
#     OUT=docs/results.md bash launch/seeds.sh [--gin.NAME=VALUE ...]
# Each seed runs in RUNS/seed_S (re-running resumes; finished stages are skipped). Extra
# arguments go to every run (e.g. --gin.run.stages="[...]" to stop after rm_eval).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
source launch/cpu_env.sh
SEEDS=${SEEDS:-0 1 2}
GIN=${GIN:-gin/runs/paper_miniature.gin}
RUNS=${RUNS:-runs/paper_miniature}
OUT=${OUT:-$RUNS/aggregate.md}
export TF_CPP_MIN_LOG_LEVEL=2
dirs=()
for s in $SEEDS; do
  d="$RUNS/seed_$s"
  echo "=== seed $s -> $d ($(date -u +%H:%M:%S)) ==="
  TIMEFORMAT="seed $s: %R s wall, %U s user, %S s sys"
  time .venv/bin/python -m warm_jax.main --gin_file="$GIN" --gin.RUN_DIR="'$d'" --gin.SEED="$s" "$@"
  dirs+=("$d")
done
.venv/bin/python -m warm_jax.stages.report "${dirs[@]}" --aggregate "$OUT" >/dev/null
echo "aggregate: $OUT"
