"""Mask computations shared by post-training pruning and the training-time scheduler."""
from __future__ import annotations

import torch

__all__ = ["magnitude_mask", "n_m_mask", "topk_keep_mask"]


def topk_keep_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the `keep` largest scores (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(scores.flatten().float(), keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """Unstructured: keep the round(dense_ratio * numel) largest |w|."""
    keep = int(round(dense_ratio * weight.numel()))
    return topk_keep_mask(weight.detach().abs(), keep)


def n_m_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M semi-structured: in every m consecutive inputs of a row keep the n largest |w|."""
    out, inp = weight.shape
    if inp % m:
        raise ValueError(f"{n}:{m} sparsity needs the input dimension ({inp}) divisible by {m}")
    groups = weight.detach().abs().reshape(out, inp // m, m)
    idx = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(out, inp)
