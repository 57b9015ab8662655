#!/usr/bin/env bash
# Reward-model training throughput and MFU on one GPU (H100/H200), bf16.
#
#   bash bench/gpu_check.sh            # from the repository root of a copy of the tree
#
# What the GPU machine needs: jax (CUDA), flax, optax, orbax-checkpoint; NOT TensorFlow
# or seqio (the benchmark imports only warm_jax.model / optim / steps / train_lib).
# The core reads its configuration through gin, a pure-Python package: where gin-config
# is missing, this script installs it from .wheels/ (prepare it on a machine with the
# registry: `pip download --no-deps -d .wheels gin-config==0.5.0`, and carry .wheels).
#
# Figures (one JSON line each, see bench/common.py): tokens/s, step time, achieved FLOP/s
# and MFU against the chip's bf16 dense peak, for a ~0.58B-parameter reward model
# (preset 'xs': 16 layers, d_model 1536, MLP 6144, 12 heads, multi-query, vocab 32k,
# bf16 activations, fp32 master weights, remat of non-matmul activations, Adafactor),
# 16 preference pairs x 1024 tokens a step (32k tokens), cuDNN fused causal attention.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STEPS="${STEPS:-10}"

if ! "$PY" -c "import gin" 2>/dev/null; then
  whl=$(ls .wheels/gin_config-*.whl 2>/dev/null | head -1)
  if [ -z "$whl" ]; then
    echo "gin-config is missing and .wheels/ has no gin_config wheel:" >&2
    echo "  pip download --no-deps -d .wheels gin-config==0.5.0   (then carry .wheels)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps "$whl" 2>/dev/null \
    || export PYTHONPATH="$PWD/$whl${PYTHONPATH:+:$PYTHONPATH}"  # a pure-Python wheel imports as a zip
fi

"$PY" - <<'PY' || exit 3
import sys
import warm_jax.model, warm_jax.optim, warm_jax.steps, warm_jax.train_lib  # noqa: F401
heavy = [m for m in ("tensorflow", "seqio") if m in sys.modules]
assert not heavy, f"the core imported {heavy}"
import jax
print(f"core imports ok; jax {jax.__version__}; devices {jax.devices()}", file=sys.stderr)
PY

run() {  # $1 = attention implementation (cudnn | none = XLA)
  "$PY" -m bench.rm_throughput --preset xs --pairs "${PAIRS:-16}" --seq "${SEQ:-1024}" \
    --steps "$STEPS" --warmup 2 --optimizers adafactor \
    --model attention_impl="$1" --model max_len="${SEQ:-1024}"
}
# The fused cuDNN path first; the XLA attention as a fallback (and as a comparison).
run cudnn || echo "cuDNN attention failed; XLA attention follows" >&2
[ "${BOTH:-1}" = 1 ] && run none
exit 0
