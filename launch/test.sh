#!/usr/bin/env bash
# Sets up the environment (launch/setup_env.sh) and runs the test suite on 8 fake CPU devices,
# two test files at a time (TEST_WORKERS=0: all in one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
source launch/cpu_env.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export TF_CPP_MIN_LOG_LEVEL=2
# Two workers (pytest-xdist), one test file each at a time (module fixtures stay in one
# process), the longest files first (tests/conftest.py).
exec .venv/bin/python -m pytest -q -x -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=30 tests "$@"
