#!/usr/bin/env bash
# Installs the peer (Hugging Face TRL RewardTrainer on PyTorch, CPU) into its own venv,
# .venv-peer/ at the repository root, so that the project's environment stays untouched.
#
#   bash bench/peer_setup.sh                      # creates .venv-peer
#   PEER_VENV=/some/where bash bench/peer_setup.sh
#
# torch is pinned to 2.13.0 and must be the CPU build ("2.13.0+cpu"): the generic Linux
# wheel of the same version pulls the CUDA stack (several GB). pip finds the CPU wheel
# through its configured find-links / extra index (point PIP_EXTRA_INDEX_URL or
# PIP_FIND_LINKS at a PyTorch CPU wheel source if yours has none). The Hugging Face
# packages are pinned to the versions that resolve together with that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PEER_VENV:-.venv-peer}"
PY="${PYTHON:-python3}"

TORCH_SPEC="torch==2.13.0"
PEER_SPECS=(trl==1.16.0 transformers==5.24.0 datasets==5.2.0 accelerate==1.15.0)

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" - <<'PY'
import sys, torch
if "+cpu" not in torch.__version__ or torch.cuda.is_available():
    sys.exit(f"expected the CPU build of torch, got {torch.__version__}")
PY
"$VENV/bin/python" -m pip install -q "${PEER_SPECS[@]}" "$TORCH_SPEC"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
print(f"peer ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}")
PY
