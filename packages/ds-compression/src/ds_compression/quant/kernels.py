"""The one door to ds_kernels' group-wise quantization (4/8-bit weights).

Everything in this package that stores or multiplies quantized weights goes through these four
functions, so the layout of a `QuantizedTensor` (packed int4 or not) stays ds_kernels' business.
`int_values` gives the unpacked integer grid, which is what ONNX export needs.
"""
from __future__ import annotations

from typing import Any

import torch
from ds_kernels import quant as _kq

QuantizedTensor = _kq.QuantizedTensor

__all__ = ["QuantizedTensor", "quantize", "dequantize", "quantized_matmul", "group_scales", "int_values"]


def _require() -> Any:
    return _kq


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> Any:
    """Group-wise quantization of a [out, in] weight along its rows (`group_size` divides `in`)."""
    return _require().quantize(w.detach(), bits, group_size, symmetric=symmetric)


def dequantize(qt: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _require().dequantize(qt, dtype=dtype)


def quantized_matmul(x: torch.Tensor, qt: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T with W held quantized (weight-only)."""
    return _require().quantized_matmul(x, qt, bias=bias)


def group_scales(qt: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero offset) reshaped to [out, in / group_size], fp32."""
    out = qt.shape[0]
    scale = qt.scale.float().reshape(out, -1)
    zero = None if qt.zero_point is None else qt.zero_point.float().reshape(out, -1)
    return scale, zero


def int_values(qt: Any) -> torch.Tensor:
    """The stored integers as an unpacked int8 [out, in] tensor: W = q * scale (+ zero) per group."""
    return qt.unpacked().reshape(qt.shape).to(torch.int8)
