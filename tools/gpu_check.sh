#!/usr/bin/env bash
# On a GPU machine: build the CUDA ops of ds-kernels into the package (in place) and run the
# gpu-marked tests against the torch references. Usage: bash tools/gpu_check.sh [extra pytest args]
# Needs nvcc and a CUDA build of torch in the Python used (PYTHON, default .venv/bin/python or python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}
export NVCC
"$PY" - <<'PYEOF'
import sys
import torch
if torch.version.cuda is None or not torch.cuda.is_available():
    sys.exit(f"gpu_check: this torch ({torch.__version__}) has no usable CUDA device")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
# Compile for the GPU actually present (e.g. 90 for H100/H200) unless DS_CUDA_ARCHS says otherwise.
ARCH=${DS_CUDA_ARCHS:-$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}{n}')")}
start=$(date +%s)
"$PY" - "$ARCH" <<'PYEOF'
import os, sys
sys.path.insert(0, "packages/ds-kernels")
os.environ["DS_CUDA_ARCHS"] = sys.argv[1]
import hatch_build
out = os.path.join("packages/ds-kernels/src/ds_kernels", "_cuda_ops.so")
hatch_build.build_cuda_library(out)
print("gpu_check: built", out)
PYEOF
echo "gpu_check: CUDA build took $(( $(date +%s) - start )) s"
# The CPU extension too, when this checkout has not built it yet (fresh machine).
if ! "$PY" -c "import ds_kernels._C" 2>/dev/null; then
  "$PY" - <<'PYEOF'
import os, sys, sysconfig
sys.path.insert(0, "packages/ds-kernels")
import hatch_build
name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
hatch_build.build_cpu_extension(os.path.join("packages/ds-kernels/src/ds_kernels", name), "packages/ds-kernels/build/ext/obj")
print("gpu_check: built the CPU extension")
PYEOF
fi
PYTHONPATH="packages/ds-kernels/src:packages/ds-core/src${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m pytest packages/ds-kernels/tests -m gpu -q -rs "$@"
