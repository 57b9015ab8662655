# Sourced by bench/peer_setup.sh and tools/hf_fixture_setup.sh: one function that makes a
# separate venv with the CPU build of torch plus the given packages.
#
#   torch_cpu_venv VENV PACKAGE...
#
# torch is pinned to 2.13.0 and must be the CPU build ("2.13.0+cpu"): the generic Linux
# wheel of the same version pulls the CUDA stack (several GB). pip finds the CPU wheel
# through its configured find-links / extra index (point PIP_EXTRA_INDEX_URL or
# PIP_FIND_LINKS at a PyTorch CPU wheel source if yours has none). PYTHON picks the
# interpreter (default python3).
TORCH_SPEC="torch==2.13.0"

torch_cpu_venv() {
  local venv="$1"; shift
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC"
  "$venv/bin/python" - <<'PY'
import sys, torch
if "+cpu" not in torch.__version__ or torch.cuda.is_available():
    sys.exit(f"expected the CPU build of torch, got {torch.__version__}")
PY
  "$venv/bin/python" -m pip install -q "$@" "$TORCH_SPEC"
  "$venv/bin/python" -m pip check
}
