"""Physically removing rows (outputs) or columns (inputs) of a linear: the step that makes
row/head pruning yield a smaller model."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["keep_rows", "keep_cols"]


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new linear with only the output features in `index` (bias entries follow)."""
    new = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[index])
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def keep_cols(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """A new linear reading only the input features in `index`; the bias is unchanged."""
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new
