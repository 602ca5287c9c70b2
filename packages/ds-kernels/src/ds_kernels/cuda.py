"""CUDA ops (multi-tensor fused Adam, group quantize/dequantize, fused bias+GeLU), loaded by ctypes.

The library `_cuda_ops.so` is built from csrc/cuda by hatch_build.py when nvcc and a CUDA torch are
present (`DS_BUILD_CUDA=1` forces, `=0` skips). It exports plain C functions taking raw pointers and a
stream, so it links no libtorch. `available()` is False without it (or without a GPU); then callers use
the torch references, which run on the GPU as ordinary torch ops.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence

import torch

from ds_kernels import reference
from ds_kernels._checks import DTYPE_CODES

__all__ = ["available", "status", "multi_tensor_adam", "quantize", "dequantize", "bias_gelu"]

LIB_NAME = "_cuda_ops.so"
_lib: ctypes.CDLL | None = None
_error: str | None = None
_loaded = False

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_F = ctypes.c_float
_INT = ctypes.c_int


def library() -> ctypes.CDLL | None:
    global _lib, _error, _loaded
    if not _loaded:
        _loaded = True
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), LIB_NAME)
        if not os.path.exists(path):
            _error = f"{LIB_NAME} not built (no nvcc or CUDA torch at install, or DS_BUILD_CUDA=0)"
            return None
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            _error = f"cannot load {path}: {exc}"
            return None
        lib.ds_cuda_multi_tensor_adam.argtypes = [
            _INT,
            ctypes.POINTER(_P),
            ctypes.POINTER(_P),
            ctypes.POINTER(_P),
            ctypes.POINTER(_P),
            ctypes.POINTER(_I64),
            _INT,
            _F,
            _F,
            _F,
            _F,
            _F,
            _F,
            _F,
            _F,
            _F,
            _INT,
            _P,
        ]
        lib.ds_cuda_quantize.argtypes = [_P, _INT, _I64, _I64, _INT, _INT, _P, _P, _P, _P]
        lib.ds_cuda_dequantize.argtypes = [_P, _INT, _P, _P, _I64, _I64, _P, _INT, _P]
        lib.ds_cuda_bias_gelu.argtypes = [_P, _P, _P, _I64, _I64, _INT, _INT, _P]
        lib.ds_cuda_error_string.restype = ctypes.c_char_p
        _lib = lib
    return _lib


def available() -> bool:
    if library() is None:
        return False
    from ds_core.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device_name() != "cpu" and acc.is_available()


def status() -> str:
    if library() is None:
        return f"not built: {_error}"
    return "compiled" + ("" if available() else " (no GPU visible)")


def _stream() -> int:
    from ds_core.accelerator import get_accelerator

    return int(get_accelerator().current_stream().cuda_stream)  # the raw cudaStream_t / hipStream_t


def _check(rc: int, op: str) -> None:
    if rc != 0:
        raise RuntimeError(f"ds_kernels.cuda.{op} failed: {_lib.ds_cuda_error_string(rc).decode()}")


def _on_gpu(name: str, t: torch.Tensor) -> None:
    if t.device.type == "cpu" or not t.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous GPU tensor, got device {t.device}, contiguous={t.is_contiguous()}"
        )


def _ptrs(ts: Sequence[torch.Tensor]):
    return (_P * len(ts))(*[t.data_ptr() for t in ts])


@torch.no_grad()
def multi_tensor_adam(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw_mode: bool = True,
    bias_correction: bool = True,
) -> None:
    """Adam/AdamW over many fp32 GPU tensors in few launches (grads fp32/bf16/fp16, all the same dtype)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("params, grads, exp_avgs and exp_avg_sqs must have the same length")
    if n == 0:
        return
    gdtype = grads[0].dtype
    for i in range(n):
        for name, t in (
            ("params", params[i]),
            ("grads", grads[i]),
            ("exp_avgs", exp_avgs[i]),
            ("exp_avg_sqs", exp_avg_sqs[i]),
        ):
            _on_gpu(f"{name}[{i}]", t)
            if t.numel() != params[i].numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements, params[{i}] has {params[i].numel()}")
        if (
            params[i].dtype != torch.float32
            or exp_avgs[i].dtype != torch.float32
            or exp_avg_sqs[i].dtype != torch.float32
        ):
            raise TypeError(f"params[{i}] and its states must be fp32")
        if grads[i].dtype != gdtype or gdtype not in DTYPE_CODES:
            raise TypeError(
                f"grads[{i}]: every grad must share one dtype of fp32/bf16/fp16, got {grads[i].dtype}"
            )
    if not available():
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            reference.adam_step(
                p,
                g,
                m,
                v,
                step=step,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                adamw_mode=adamw_mode,
                bias_correction=bias_correction,
            )
        return
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    decay = 1.0 - lr * weight_decay if adamw_mode else 1.0
    numels = (_I64 * n)(*[p.numel() for p in params])
    rc = _lib.ds_cuda_multi_tensor_adam(
        n,
        _ptrs(params),
        _ptrs(grads),
        _ptrs(exp_avgs),
        _ptrs(exp_avg_sqs),
        numels,
        DTYPE_CODES[gdtype],
        beta1,
        beta2,
        1.0 - beta1,
        1.0 - beta2,
        eps,
        weight_decay,
        decay,
        lr / bc1,
        1.0 / math.sqrt(bc2),
        int(adamw_mode),
        _stream(),
    )
    _check(rc, "multi_tensor_adam")


def quantize(x: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """GPU twin of ds_kernels.quant.quantize (same layout and formulas); used by it for GPU tensors."""
    from ds_kernels.quant import QuantizedTensor

    _on_gpu("x", x)
    n_groups = x.numel() // group_size
    last = x.shape[-1] // 2 if bits == 4 else x.shape[-1]
    data = torch.empty(*x.shape[:-1], last, dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device)
    scale = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    zp = None if symmetric else torch.empty(n_groups, dtype=torch.float32, device=x.device)
    rc = _lib.ds_cuda_quantize(
        x.data_ptr(),
        DTYPE_CODES[x.dtype],
        n_groups,
        group_size,
        bits,
        int(symmetric),
        data.data_ptr(),
        scale.data_ptr(),
        0 if zp is None else zp.data_ptr(),
        _stream(),
    )
    _check(rc, "quantize")
    return QuantizedTensor(data, scale, zp, bits, group_size, x.shape, x.dtype)


def dequantize(qt, dtype: torch.dtype) -> torch.Tensor:
    """GPU twin of ds_kernels.quant.dequantize."""
    for name, t in (("data", qt.data), ("scale", qt.scale)):
        _on_gpu(name, t)
    out = torch.empty(qt.shape, dtype=dtype, device=qt.data.device)
    n_groups = qt.shape.numel() // qt.group_size
    zp = 0 if qt.zero_point is None else qt.zero_point.data_ptr()
    rc = _lib.ds_cuda_dequantize(
        qt.data.data_ptr(),
        qt.bits,
        qt.scale.data_ptr(),
        zp,
        n_groups,
        qt.group_size,
        out.data_ptr(),
        DTYPE_CODES[dtype],
        _stream(),
    )
    _check(rc, "dequantize")
    return out


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) in one pass; bias broadcasts over the last dim. approximate: 'none' (erf) or 'tanh'."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is not None and (bias.shape != (x.shape[-1],) or bias.dtype != x.dtype):
        raise ValueError(
            f"bias must have shape ({x.shape[-1]},) and dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"bias_gelu: x must be fp32, bf16 or fp16, got {x.dtype}")
    if not available() or x.device.type == "cpu":
        return reference.bias_gelu(x, bias, approximate)
    _on_gpu("x", x)
    if bias is not None:
        _on_gpu("bias", bias)
    out = torch.empty_like(x)
    rc = _lib.ds_cuda_bias_gelu(
        x.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        x.numel(),
        x.shape[-1],
        DTYPE_CODES[x.dtype],
        int(approximate == "tanh"),
        _stream(),
    )
    _check(rc, "bias_gelu")
    return out
