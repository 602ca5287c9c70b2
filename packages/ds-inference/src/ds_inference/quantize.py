"""Weight-only INT8/INT4 quantization of a model's linears (ds_kernels.quant underneath)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QuantizedLinear", "quantize_linears"]


class QuantizedLinear(nn.Module):
    """x @ W.T + b with W stored group-quantized; the matmul dequantizes on the fly."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__()
        from ds_kernels import quant

        self._quant = quant
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.qweight = quant.quantize(linear.weight.data.float(), bits, group_size, symmetric=symmetric)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        )
        self.weight_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant.quantized_matmul(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.qweight.bits}, group={self.qweight.group_size}"


def quantize_linears(root: nn.Module, bits: int, group_size: int, symmetric: bool = True) -> int:
    """Replace every nn.Linear under ``root`` whose input width divides into groups; returns the count."""
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % group_size == 0:
                setattr(parent, name, QuantizedLinear(child, bits, group_size, symmetric))
                count += 1
    if count == 0:
        raise ValueError(
            f"no linear layer has an input width divisible by quant.weight.group_size={group_size}"
        )
    return count
