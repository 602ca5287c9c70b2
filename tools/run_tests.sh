#!/usr/bin/env bash
# README command 2 (and what .ci/run calls): set up the environment, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
if [ -f ../shared/tools/check_layers.py ]; then
  .venv/bin/python ../shared/tools/check_layers.py   # the package import DAG of DESIGN.md
fi
exec .venv/bin/python -m pytest "$@"
