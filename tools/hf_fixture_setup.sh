#!/usr/bin/env bash
# Installs transformers + torch (CPU) into their own venv, .venv-hf/ at the repository root,
# for tools/make_hf_fixtures.py and tools/check_hf_exports.py. The project's environment
# never needs torch: the fixtures they write are committed under tests/fixtures/hf/.
#
#   bash tools/hf_fixture_setup.sh                  # creates .venv-hf
#   HF_VENV=/some/where bash tools/hf_fixture_setup.sh
#   WITH_MERGEKIT=1 bash tools/hf_fixture_setup.sh  # + mergekit, for bench/hf_checkpoints.py
#
# torch must be the CPU build (see bench/peer_setup.sh for where pip finds it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_VENV:-.venv-hf}"
PY="${PYTHON:-python3}"

TORCH_SPEC="torch==2.13.0"
HF_SPECS=(transformers==5.24.0 safetensors tokenizers numpy)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" - <<'PY'
import sys, torch
if "+cpu" not in torch.__version__ or torch.cuda.is_available():
    sys.exit(f"expected the CPU build of torch, got {torch.__version__}")
PY
"$VENV/bin/python" -m pip install -q "${HF_SPECS[@]}" "$TORCH_SPEC"
if [ "${WITH_MERGEKIT:-0}" = "1" ]; then
  "$VENV/bin/python" -m pip install -q mergekit==0.1.5 "${HF_SPECS[@]}" "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'PY'
import torch, transformers
print(f"hf fixture venv ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
