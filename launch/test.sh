#!/usr/bin/env bash
# Sets up the environment (launch/setup_env.sh) and runs the test suite on 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/python -m pytest -q -x --durations=30 tests "$@"
