"""A float linear that trains through its own quantization (straight-through), then freezes into a
`QuantLinear`. Used by LKD (ZeroQuant) and XTC distillation."""
from __future__ import annotations

import torch
from torch import nn

from .clipping import fake_quantize_ranges
from .functional import fake_quantize_weight, quantize_activation_tokenwise
from .modules import QuantLinear

__all__ = ["FakeQuantLinear"]


class FakeQuantLinear(nn.Module):
    """`ranges` (per-group scale, zero-or-None) fixes each group's quantization range instead of its
    min/max; with `learn_ranges` they become parameters trained with the weights (LSQ-style): the
    scale as its logarithm, so one learning rate means the same relative step for every group and a
    scale can never cross zero. `range_parameters()` lists them (LKD gives them their own rate)."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_bits: int,
        group_size: int | None,
        act_bits: int | None = None,
        symmetric: bool = True,
        act_symmetric: bool = True,
        ranges: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        learn_ranges: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_bits = weight_bits
        self.group_size = group_size or linear.in_features
        self.act_bits = act_bits
        self.symmetric = symmetric
        self.act_symmetric = act_symmetric
        if learn_ranges and ranges is None:
            raise ValueError("learn_ranges needs initial ranges")
        self.log_scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None
        if ranges is not None:
            del self.log_scale, self.zero  # registered below as parameters or buffers
            log_s = ranges[0].detach().float().clamp_min(1e-10).log()
            zero = None if ranges[1] is None else ranges[1].detach().float().clone()
            if learn_ranges:
                self.log_scale = nn.Parameter(log_s)
                self.zero = None if zero is None else nn.Parameter(zero)
            else:
                self.register_buffer("log_scale", log_s)
                self.register_buffer("zero", zero)

    def range_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.log_scale, self.zero) if isinstance(p, nn.Parameter)]
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = quantize_activation_tokenwise(x, self.act_bits, self.act_symmetric)
        if self.log_scale is not None:
            w = fake_quantize_ranges(self.weight, self.log_scale.exp(), self.zero, self.weight_bits, self.group_size)
        else:
            w = fake_quantize_weight(self.weight, self.weight_bits, self.group_size, self.symmetric)
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    def to_quant_linear(self) -> QuantLinear:
        ranges = None
        if self.log_scale is not None:
            ranges = (self.log_scale.detach().exp(), None if self.zero is None else self.zero.detach())
        return QuantLinear.from_weight(
            self.weight.detach(),
            None if self.bias is None else self.bias.detach(),
            weight_bits=self.weight_bits,
            group_size=self.group_size,
            act_bits=self.act_bits,
            symmetric=self.symmetric,
            act_symmetric=self.act_symmetric,
            ranges=ranges,
        )
