"""Group-wise INT8/INT4 quantization along the last dim, and a fused dequantize+matmul for CPU weights.

Layout (`QuantizedTensor`): `data` is int8 of the input's shape, or for 4 bits uint8 with the last dim
halved (element 2i in the low nibble, 2i+1 in the high, both signed); `scale` (and `zero_point` when
asymmetric) are fp32 with one value per group of `group_size` consecutive elements of the last dim.
Dequantized value: q * scale (+ zero_point). See `reference.quantize_groups` for the exact formulas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ds_kernels import _loader, reference
from ds_kernels._checks import DTYPE_CODES, dtype_code, ptr

__all__ = ["QuantizedTensor", "available", "quantize", "dequantize", "quantized_matmul"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class QuantizedTensor:
    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def nbytes(self) -> int:
        extra = 0 if self.zero_point is None else self.zero_point.numel() * 4
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4 + extra

    def unpacked(self) -> torch.Tensor:
        """The stored integers as int8 of the original shape (4-bit values sign-extended)."""
        return reference.unpack_int4(self.data) if self.bits == 4 else self.data


def available() -> bool:
    """True when the compiled CPU quantization kernels are loaded."""
    ext = _loader.extension()
    return ext is not None and hasattr(ext, "quantize")


def _use_cuda(t: torch.Tensor) -> bool:
    if t.device.type == "cpu":
        return False
    from ds_kernels import cuda

    return cuda.available()


def _use_compiled(t: torch.Tensor, op: str) -> bool:
    if t.device.type != "cpu":
        return False  # GPU tensors: ds_kernels.cuda when built (checked by the caller), else torch ops
    if available():
        return True
    _loader.fallback_warning(op)
    return False


def _check_layout(x_shape: torch.Size, bits: int, group_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if len(x_shape) == 0:
        raise ValueError("cannot quantize a 0-dim tensor (groups run along the last dim)")
    last = x_shape[-1]
    if group_size <= 0 or last % group_size != 0:
        raise ValueError(f"group_size {group_size} must be positive and divide the last dim ({last})")
    if bits == 4 and group_size % 2 != 0:
        raise ValueError(f"INT4 packs two values per byte: group_size must be even, got {group_size}")


def quantize(x: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> QuantizedTensor:
    """Quantize `x` (fp32/bf16/fp16) group-wise along its last dim to INT8 or packed INT4."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantize: x must be fp32, bf16 or fp16, got {x.dtype}")
    _check_layout(x.shape, bits, group_size)
    x = x.contiguous()
    n_groups = x.numel() // group_size
    if _use_cuda(x):
        from ds_kernels import cuda

        return cuda.quantize(x, bits, group_size, symmetric)
    if _use_compiled(x, "quantize"):
        packed_last = x.shape[-1] // 2 if bits == 4 else x.shape[-1]
        data = torch.empty(*x.shape[:-1], packed_last, dtype=torch.uint8 if bits == 4 else torch.int8)
        scale = torch.empty(n_groups, dtype=torch.float32)
        zero_point = None if symmetric else torch.empty(n_groups, dtype=torch.float32)
        _loader.extension().quantize(
            ptr(x),
            dtype_code(x),
            n_groups,
            group_size,
            bits,
            bool(symmetric),
            ptr(data),
            ptr(scale),
            ptr(zero_point),
            _loader.num_threads(),
        )
    else:
        q, scale, zero_point = reference.quantize_groups(x, bits, group_size, symmetric)
        data = reference.pack_int4(q) if bits == 4 else q
    return QuantizedTensor(data, scale, zero_point, bits, group_size, x.shape, x.dtype)


def _check_qt(qt: QuantizedTensor) -> None:
    _check_layout(qt.shape, qt.bits, qt.group_size)
    n_groups = qt.shape.numel() // qt.group_size
    expect = torch.uint8 if qt.bits == 4 else torch.int8
    if qt.data.dtype != expect:
        raise TypeError(f"QuantizedTensor.data must be {expect} for {qt.bits} bits, got {qt.data.dtype}")
    want = qt.shape.numel() // 2 if qt.bits == 4 else qt.shape.numel()
    if qt.data.numel() != want:
        raise ValueError(
            f"QuantizedTensor.data has {qt.data.numel()} elements, expected {want} for {tuple(qt.shape)}"
        )
    for name, t in (("scale", qt.scale), ("zero_point", qt.zero_point)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != n_groups):
            raise ValueError(
                f"QuantizedTensor.{name} must be fp32 with {n_groups} values, got {t.dtype} x {t.numel()}"
            )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float tensor that `qt` stands for, in `dtype` (default: the dtype it was quantized from)."""
    _check_qt(qt)
    dtype = dtype or qt.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dequantize: dtype must be fp32, bf16 or fp16, got {dtype}")
    n_groups = qt.shape.numel() // qt.group_size
    if _use_cuda(qt.data):
        from ds_kernels import cuda

        return cuda.dequantize(qt, dtype)
    if _use_compiled(qt.data, "dequantize"):
        data, scale = qt.data.contiguous(), qt.scale.contiguous()
        zp = None if qt.zero_point is None else qt.zero_point.contiguous()
        out = torch.empty(qt.shape, dtype=dtype)
        _loader.extension().dequantize(
            ptr(data),
            qt.bits,
            ptr(scale),
            ptr(zp),
            n_groups,
            qt.group_size,
            ptr(out),
            DTYPE_CODES[dtype],
            _loader.num_threads(),
        )
        return out
    return reference.dequantize_groups(qt.unpacked(), qt.scale, qt.zero_point, qt.group_size).to(dtype)


def quantized_matmul(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T for a weight W [out, in] quantized along `in`; x is [..., in]; result in x's dtype."""
    _check_qt(qt)
    if len(qt.shape) != 2:
        raise ValueError(f"quantized_matmul: weight must be 2-D [out, in], got shape {tuple(qt.shape)}")
    n_out, k = qt.shape
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"quantized_matmul: x must be fp32, bf16 or fp16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"quantized_matmul: x has last dim {x.shape[-1]}, weight expects {k}")
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"quantized_matmul: bias must have shape ({n_out},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    if _use_compiled(x, "quantized_matmul") and qt.data.device.type == "cpu":
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        b = None if bias is None else bias.to(device="cpu", dtype=torch.float32).contiguous()
        out = torch.empty(x2.shape[0], n_out, dtype=torch.float32)
        # Bound to names so the contiguous copies outlive the raw pointers handed to C++.
        data, scale = qt.data.contiguous(), qt.scale.contiguous()
        zp = None if qt.zero_point is None else qt.zero_point.contiguous()
        _loader.extension().quantized_matmul(
            ptr(x2),
            x2.shape[0],
            k,
            ptr(data),
            qt.bits,
            ptr(scale),
            ptr(zp),
            n_out,
            qt.group_size,
            ptr(b),
            ptr(out),
            _loader.num_threads(),
        )
        return out.reshape(*lead, n_out).to(x.dtype)
    out = reference.quantized_matmul(
        x.reshape(-1, k), qt.unpacked(), qt.scale, qt.zero_point, qt.group_size, bias
    )
    return out.reshape(*lead, n_out).to(x.dtype)
