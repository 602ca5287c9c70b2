"""Post-training weight pruning that keeps shapes: unstructured magnitude and N:M (2:4) sparsity.

Masks are applied by zeroing the weights, so the pruning is permanent and needs no hooks.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ..history import record_method
from ..model_utils import CompressionInputError, select_linears
from .masks import magnitude_mask, n_m_mask

__all__ = ["prune_magnitude", "prune_n_m", "sparsity"]


def sparsity(model: nn.Module, modules: Iterable[str] | None = None, exclude: Iterable[str] = ("lm_head",)) -> float:
    """Fraction of zero weights over the selected linears."""
    zeros = total = 0
    for _, lin in select_linears(model, modules, tuple(exclude)):
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / max(total, 1)


def prune_magnitude(
    model: nn.Module,
    *,
    sparsity_ratio: float,
    modules: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """A copy of `model` with the smallest-magnitude `sparsity_ratio` of each selected weight set to 0."""
    if not 0.0 < sparsity_ratio < 1.0:
        raise CompressionInputError(f"sparsity must be in (0, 1), got {sparsity_ratio}")
    select_linears(model, modules, tuple(exclude))
    out = copy.deepcopy(model)
    chosen = select_linears(out, modules, tuple(exclude))
    with torch.no_grad():
        for _, lin in chosen:
            lin.weight.mul_(magnitude_mask(lin.weight, 1.0 - sparsity_ratio).to(lin.weight.dtype))
    record_method(out, {"method": "sparse", "sparsity": sparsity_ratio, "layers": len(chosen)})
    return out


def prune_n_m(
    model: nn.Module,
    *,
    n: int = 2,
    m: int = 4,
    modules: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """A copy of `model` with N:M semi-structured sparsity (2:4 by default) on each selected linear."""
    if not 0 < n < m:
        raise CompressionInputError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    bad = [f"{name} (in_features={lin.in_features})" for name, lin in select_linears(model, modules, tuple(exclude))
           if lin.in_features % m]
    if bad:
        raise CompressionInputError(f"{n}:{m} sparsity needs input dims divisible by {m}: {', '.join(bad[:4])}")
    out = copy.deepcopy(model)
    chosen = select_linears(out, modules, tuple(exclude))
    with torch.no_grad():
        for _, lin in chosen:
            lin.weight.mul_(n_m_mask(lin.weight, n, m).to(lin.weight.dtype))
    record_method(out, {"method": f"sparse_{n}:{m}", "layers": len(chosen)})
    return out
