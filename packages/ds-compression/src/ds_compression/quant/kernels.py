"""The one door to ds_kernels' group-wise quantization (4/8-bit weights).

Everything in this package that stores or multiplies quantized weights goes through these four
functions, so the layout of a `QuantizedTensor` (packed int4 or not) stays ds_kernels' business.
`int_values` gives the unpacked integer grid, which is what ONNX export needs.
"""
from __future__ import annotations

from typing import Any

import torch
from ds_kernels import quant as _kq
from ds_kernels.reference import pack_int4

QuantizedTensor = _kq.QuantizedTensor

__all__ = [
    "QuantizedTensor",
    "quantize",
    "quantize_with_scales",
    "int_range",
    "dequantize",
    "quantized_matmul",
    "group_scales",
    "int_values",
]


def _require() -> Any:
    return _kq


def quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> Any:
    """Group-wise quantization of a [out, in] weight along its rows (`group_size` divides `in`)."""
    return _require().quantize(w.detach(), bits, group_size, symmetric=symmetric)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The stored integer range: [-qmax, qmax] symmetric, [-2^(b-1), 2^(b-1) - 1] asymmetric (ds_kernels' layout)."""
    hi = (1 << (bits - 1)) - 1
    return (-hi if symmetric else -hi - 1), hi


def quantize_with_scales(
    w: torch.Tensor, bits: int, group_size: int, scale: torch.Tensor, zero: torch.Tensor | None = None
) -> Any:
    """Group-wise quantization with given per-group ranges (clipped or learned) instead of min/max.

    `scale` (and `zero`, the float offset of asymmetric groups) hold one value per group, in the
    order of ds_kernels' layout (row-major groups). Values outside the range are clipped:
    q = clamp(round((w - zero) / scale)), and q * scale + zero is what the model computes with.
    """
    lo, hi = int_range(bits, zero is None)
    groups = w.detach().float().reshape(-1, group_size)
    s = scale.detach().float().reshape(-1, 1)
    if s.shape[0] != groups.shape[0]:
        raise ValueError(f"{s.shape[0]} scales for {groups.shape[0]} groups")
    shifted = groups if zero is None else groups - zero.detach().float().reshape(-1, 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round(shifted / safe), torch.zeros_like(shifted)).clamp_(lo, hi)
    q = q.to(torch.int8).reshape(w.shape)
    data = pack_int4(q) if bits == 4 else q
    zp = None if zero is None else zero.detach().float().reshape(-1).contiguous()
    return QuantizedTensor(data.contiguous(), s.reshape(-1).contiguous(), zp, bits, group_size, w.shape, w.dtype)


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
