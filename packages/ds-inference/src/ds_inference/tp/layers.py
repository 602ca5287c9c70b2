"""The sharded modules tensor parallelism swaps in: row-parallel linears that all-reduce."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from ds_core import comm
from torch import nn

__all__ = ["LinearAllreduce", "MoEExpertsAllreduce", "conv1d_to_linear", "is_linear_like"]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def conv1d_to_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear computing the same function (Conv1D stores its weight as (in, out))."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight.data.t().contiguous()
    linear = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=module.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
    return linear


class LinearAllreduce(nn.Module):
    """Row-parallel linear: this rank's slice of the input features, outputs summed over the group.

    The bias is added once, after the reduction.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, tp: int, rank: int, group: Any, unit: int = 1) -> LinearAllreduce:
        cols = linear.in_features
        if cols % (tp * unit):
            raise ValueError(
                f"cannot split {cols} input features into {tp} shards of whole heads ({unit} wide)"
            )
        size = cols // tp
        w = linear.weight.data[:, rank * size : (rank + 1) * size].contiguous()
        b = None if linear.bias is None else linear.bias.data.clone()
        return cls(w, b, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        comm.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features(local)={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class MoEExpertsAllreduce(nn.Module):
    """Fused experts with a sharded intermediate dim: each rank's partial sum, then one all-reduce."""

    def __init__(self, experts: nn.Module, group: Any) -> None:
        super().__init__()
        self.experts = experts
        self.group = group

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.experts(*args, **kwargs)
        comm.all_reduce(out, group=self.group)
        return out
