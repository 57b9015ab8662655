#!/usr/bin/env bash
# Installs the peer (Hugging Face TRL RewardTrainer on PyTorch, CPU) into its own venv,
# .venv-peer/ at the repository root, so that the project's environment stays untouched.
#
#   bash bench/peer_setup.sh                      # creates .venv-peer
#   PEER_VENV=/some/where bash bench/peer_setup.sh
#
# torch is the CPU build of 2.13.0 (tools/torch_cpu_venv.sh says where pip finds it); the
# Hugging Face packages are pinned to the versions that resolve together with that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/torch_cpu_venv.sh
VENV="${PEER_VENV:-.venv-peer}"

torch_cpu_venv "$VENV" trl==1.16.0 transformers==5.24.0 datasets==5.2.0 accelerate==1.15.0
"$VENV/bin/python" - <<'PY'
import torch, transformers, trl
print(f"peer ready: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"trl {trl.__version__}")
PY
