#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set up the environment, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
.venv/bin/python ../shared/tools/check_layers.py 2>/dev/null || python3 "$(pwd)/../shared/tools/check_layers.py"
exec .venv/bin/python -m pytest "$@"
