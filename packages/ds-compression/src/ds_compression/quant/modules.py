"""Inference modules that replace nn.Linear in a compressed model.

`QuantLinear` stores its weight quantized: 4/8-bit group-wise through ds_kernels (weight-only matmul),
or 1/2-bit (XTC binary/ternary) as packed codes with one scale per row. Optional token-wise dynamic
activation quantization (W8A8) quantizes the input before the matmul.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import kernels
from .functional import binary_weight, check_bits, quantize_activation_tokenwise, ternary_weight
from .packing import pack_codes, unpack_codes

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """y = act_quant(x) @ W_q.T + b with W_q held in its quantized form."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_bits: int,
        group_size: int | None = None,
        act_bits: int | None = None,
        symmetric: bool = True,
        act_symmetric: bool = True,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_bits(weight_bits, (1, 2, 4, 8), "weight quantization")
        if act_bits is not None:
            check_bits(act_bits, (4, 8), "activation quantization")
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits = weight_bits
        self.group_size = group_size or in_features
        self.act_bits = act_bits
        self.symmetric = symmetric
        self.act_symmetric = act_symmetric
        self.weight_dtype = torch.float32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_bits: int,
        group_size: int | None = None,
        act_bits: int | None = None,
        symmetric: bool = True,
        act_symmetric: bool = True,
        ranges: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> QuantLinear:
        """`ranges`: per-group (scale, zero) to quantize with (from a clipping search or LKD) instead
        of each group's min/max; zero is None for symmetric weights."""
        out_features, in_features = weight.shape
        group = group_size or in_features
        if weight_bits in (4, 8) and in_features % group:
            raise ValueError(
                f"group size {group} does not divide the input dimension {in_features}; "
                "pick a divisor (or omit --group-size for one group per row)"
            )
        mod = cls(in_features, out_features, weight_bits, group, act_bits, symmetric, act_symmetric, bias)
        mod.weight_dtype = weight.dtype
        w = weight.detach()
        if ranges is not None and (weight_bits not in (4, 8) or (ranges[1] is None) != symmetric):
            raise ValueError("ranges need 4/8-bit weights and a zero offset exactly when asymmetric")
        if ranges is not None:
            qt = kernels.quantize_with_scales(w, weight_bits, group, ranges[0], ranges[1])
            mod._set_quantized(qt.data, qt.scale, qt.zero_point)
        elif weight_bits in (4, 8):
            qt = kernels.quantize(w, weight_bits, group, symmetric=symmetric)
            mod._set_quantized(qt.data, qt.scale, qt.zero_point)
        else:
            wq = binary_weight(w.float()) if weight_bits == 1 else ternary_weight(w.float())
            scale = wq.abs().amax(dim=1)
            signs = torch.sign(wq).to(torch.int8)
            codes = (signs > 0).to(torch.uint8) if weight_bits == 1 else (signs + 1).to(torch.uint8)
            mod._set_quantized(pack_codes(codes, weight_bits), scale, None)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> QuantLinear:
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    def _set_quantized(self, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.register_buffer("qweight", data.contiguous())
        self.register_buffer("scales", scale.contiguous())
        if zero is not None:
            self.register_buffer("zeros", zero.contiguous())
        else:
            self.zeros = None

    # -- the stored weight ---------------------------------------------------------------------
    def quantized_tensor(self) -> Any:
        """The ds_kernels QuantizedTensor for 4/8-bit weights."""
        return kernels.QuantizedTensor(
            data=self.qweight,
            scale=self.scales,
            zero_point=self.zeros,
            bits=self.weight_bits,
            group_size=self.group_size,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.weight_dtype
        if self.weight_bits in (4, 8):
            return kernels.dequantize(self.quantized_tensor(), dtype=dtype)
        codes = unpack_codes(self.qweight, self.weight_bits, self.in_features).to(torch.float32)
        signs = codes * 2 - 1 if self.weight_bits == 1 else codes - 1
        return (signs * self.scales[:, None]).to(dtype)

    def int_weight(self) -> torch.Tensor:
        """Unpacked integer codes [out, in] (signed) for export."""
        if self.weight_bits in (4, 8):
            return kernels.int_values(self.quantized_tensor())
        codes = unpack_codes(self.qweight, self.weight_bits, self.in_features).to(torch.int8)
        return codes * 2 - 1 if self.weight_bits == 1 else codes - 1

    def weight_scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero) shaped [out, groups]; groups == 1 for 1/2-bit weights."""
        if self.weight_bits in (4, 8):
            return kernels.group_scales(self.quantized_tensor())
        return self.scales.float()[:, None], None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = quantize_activation_tokenwise(x, self.act_bits, self.act_symmetric)
        if self.weight_bits in (4, 8):
            out = kernels.quantized_matmul(x, self.quantized_tensor(), bias=None)
            out = out.to(x.dtype)
        else:
            out = torch.nn.functional.linear(x, self.dequantized_weight(x.dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def scheme(self) -> dict:
        return {
            "type": "QuantLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight_bits": self.weight_bits,
            "group_size": self.group_size,
            "act_bits": self.act_bits,
            "symmetric": self.symmetric,
            "act_symmetric": self.act_symmetric,
            "bias": self.bias is not None,
            "weight_dtype": str(self.weight_dtype).replace("torch.", ""),
        }

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, w{self.weight_bits}"
            f"{'' if self.act_bits is None else f'a{self.act_bits}'}, group={self.group_size}"
        )
