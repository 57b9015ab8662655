#!/usr/bin/env bash
# Installs transformers + torch (CPU) into their own venv, .venv-hf/ at the repository root,
# for tools/make_hf_fixtures.py and tools/check_hf_exports.py. The project's environment
# never needs torch: the fixtures they write are committed under tests/fixtures/hf/.
#
#   bash tools/hf_fixture_setup.sh                  # creates .venv-hf
#   HF_VENV=/some/where bash tools/hf_fixture_setup.sh
#   WITH_MERGEKIT=1 bash tools/hf_fixture_setup.sh  # + mergekit, for bench/hf_checkpoints.py
#
# torch is the CPU build of 2.13.0 (tools/torch_cpu_venv.sh says where pip finds it).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/torch_cpu_venv.sh
VENV="${HF_VENV:-.venv-hf}"

HF_SPECS=(transformers==5.24.0 safetensors tokenizers numpy)
if [ "${WITH_MERGEKIT:-0}" = "1" ]; then
  HF_SPECS+=(mergekit==0.1.5)
fi
torch_cpu_venv "$VENV" "${HF_SPECS[@]}"
"$VENV/bin/python" - <<'PY'
import torch, transformers
print(f"hf fixture venv ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
