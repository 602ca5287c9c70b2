"""A float linear that trains through its own quantization (straight-through), then freezes into a
`QuantLinear`. Used by LKD (ZeroQuant) and XTC distillation."""
from __future__ import annotations

import torch
from torch import nn

from .functional import fake_quantize_weight, quantize_activation_tokenwise
from .modules import QuantLinear

__all__ = ["FakeQuantLinear"]


class FakeQuantLinear(nn.Module):
    def __init__(
        self,
        linear: nn.Linear,
        weight_bits: int,
        group_size: int | None,
        act_bits: int | None = None,
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_bits = weight_bits
        self.group_size = group_size or linear.in_features
        self.act_bits = act_bits
        self.symmetric = symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = quantize_activation_tokenwise(x, self.act_bits)
        w = fake_quantize_weight(self.weight, self.weight_bits, self.group_size, self.symmetric)
        return nn.functional.linear(x, w, self.bias)

    def to_quant_linear(self) -> QuantLinear:
        return QuantLinear.from_weight(
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            weight_bits=self.weight_bits,
            group_size=self.group_size,
            act_bits=self.act_bits,
            symmetric=self.symmetric,
        )
