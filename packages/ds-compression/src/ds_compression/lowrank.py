"""Low-rank factorization: a linear W [out, in] becomes up @ down with rank r, initialized from the SVD."""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from .history import record_method
from .model_utils import CompressionInputError, count_parameters, select_linears, set_module

__all__ = ["LowRankLinear", "low_rank"]


class LowRankLinear(nn.Module):
    """y = up(down(x)); down: in -> rank (no bias), up: rank -> out (keeps the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """Best rank-r approximation (Eckart-Young): W ~ (U_r sqrt(S_r)) (sqrt(S_r) V_r^T)."""
        w = linear.weight.detach().float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        mod = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        with torch.no_grad():
            mod.up.weight.copy_((u[:, :rank] * root).to(linear.weight.dtype))
            mod.down.weight.copy_((root[:, None] * vh[:rank]).to(linear.weight.dtype))
            if linear.bias is not None:
                mod.up.bias.copy_(linear.bias)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def scheme(self) -> dict:
        return {
            "type": "LowRankLinear",
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.up.bias is not None,
        }


def low_rank(
    model: nn.Module,
    *,
    rank: int | None = None,
    rank_ratio: float | None = None,
    modules: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """A copy of `model` with each selected linear replaced by a rank-`rank` factorization.

    Give `rank` (absolute) or `rank_ratio` (fraction of min(in, out)). Layers where the factors would
    not be smaller than the original are refused, since they would save nothing.
    """
    if (rank is None) == (rank_ratio is None):
        raise CompressionInputError("give exactly one of rank= or rank_ratio=")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise CompressionInputError(f"rank must be a positive integer, got {rank!r}")
    if rank_ratio is not None and not 0.0 < rank_ratio < 1.0:
        raise CompressionInputError(f"rank_ratio must be in (0, 1), got {rank_ratio}")
    chosen = select_linears(model, modules, tuple(exclude))
    plan = {}
    for name, lin in chosen:
        r = rank if rank is not None else max(1, int(round(rank_ratio * min(lin.in_features, lin.out_features))))
        if r * (lin.in_features + lin.out_features) >= lin.in_features * lin.out_features:
            raise CompressionInputError(
                f"rank {r} for '{name}' ({lin.out_features}x{lin.in_features}) would not reduce its size; "
                f"use rank < {lin.in_features * lin.out_features // (lin.in_features + lin.out_features)}"
            )
        plan[name] = r
    before = count_parameters(model)
    out = copy.deepcopy(model)
    for name, r in plan.items():
        set_module(out, name, LowRankLinear.from_linear(out.get_submodule(name), r))
    after = count_parameters(out)
    record_method(
        out,
        {"method": "low_rank", "layers": len(plan), "ranks": sorted(set(plan.values())),
         "params_before": before, "params_after": after, "param_savings": round(1 - after / before, 4)},
    )
    return out
