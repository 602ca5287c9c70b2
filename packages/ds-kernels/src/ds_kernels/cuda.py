"""CUDA ops (fused multi-tensor Adam, group quantize/dequantize, fused bias+GeLU), loaded by ctypes.

The library `_cuda_ops.so` is built from csrc/cuda by hatch_build.py when nvcc and a GPU torch are present
(`DS_BUILD_CUDA=1` forces, `=0` skips). It exports plain C functions taking raw pointers and a stream,
so it links no libtorch. Without it, GPU tensors go through the torch references.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

_lib: Optional[ctypes.CDLL] = None
_error: Optional[str] = None
_loaded = False

LIB_NAME = "_cuda_ops.so"


def library() -> Optional[ctypes.CDLL]:
    global _lib, _error, _loaded
    if not _loaded:
        _loaded = True
        path = os.path.join(os.path.dirname(__file__), LIB_NAME)
        if not os.path.exists(path):
            _error = f"{LIB_NAME} not built (no nvcc/GPU torch at install, or DS_BUILD_CUDA=0)"
        else:
            try:
                _lib = ctypes.CDLL(path)
            except OSError as exc:
                _error = f"cannot load {path}: {exc}"
    return _lib


def available() -> bool:
    return library() is not None


def status() -> str:
    return "compiled (" + LIB_NAME + ")" if available() else f"not built: {_error}"
