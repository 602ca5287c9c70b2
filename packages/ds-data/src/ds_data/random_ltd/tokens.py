"""Pick, gather and scatter the tokens a random-LTD layer keeps; slice masks and positions to match.

All helpers work on the batch-first layout ``[B, T, ...]``. Kept indices are sorted per sample, so
the kept tokens stay in their original order: a causal mask restricted to them is still causal, and
rotary/absolute positions gathered with them are still the tokens' true positions.
"""

from __future__ import annotations

import torch

__all__ = ["gather_mask", "gather_tokens", "sample_kept_indices", "scatter_tokens"]


def sample_kept_indices(
    batch: int, seqlen: int, keep: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[batch, keep]`` sorted random token positions, drawn independently for each sample."""
    if not 0 < keep <= seqlen:
        raise ValueError(f"keep must be in [1, {seqlen}], got {keep}")
    # argsort of uniform noise = a uniform random permutation per row; cheaper than randperm in a loop.
    # Without a generator the noise comes from the global RNG of `device` (checkpoint-safe).
    noise = torch.rand(
        batch, seqlen, generator=generator, device=device if generator is None else generator.device
    )
    kept = noise.argsort(dim=1)[:, :keep].sort(dim=1).values
    return kept.to(device)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b]]`` for a ``[B, T, ...]`` tensor (a ``[1, T, ...]`` tensor is broadcast over B)."""
    batch = idx.shape[0]
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, *x.shape[1:])
    index = idx.view(batch, idx.shape[1], *([1] * (x.dim() - 2))).expand(batch, idx.shape[1], *x.shape[2:])
    return torch.gather(x, 1, index)


def scatter_tokens(full: torch.Tensor, part: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`full` with rows ``idx[b]`` of sample b replaced by `part` (out of place, differentiable)."""
    index = idx.view(idx.shape[0], idx.shape[1], *([1] * (full.dim() - 2))).expand_as(part)
    return full.scatter(1, index, part)


def gather_mask(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Restrict an attention mask to the kept tokens.

    ``[B|1, h, T, T]`` masks keep rows and columns ``idx[b]``; ``[B|1, T]`` padding masks keep columns.
    """
    batch, keep = idx.shape
    if mask.dim() == 2:
        return gather_tokens(mask, idx)
    if mask.dim() != 4:
        raise ValueError(
            f"random-LTD handles 2-D [B, T] and 4-D [B, h, T, T] attention masks, got shape {tuple(mask.shape)}"
        )
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, *mask.shape[1:])
    heads, cols = mask.shape[1], mask.shape[3]
    rows = idx.view(batch, 1, keep, 1).expand(batch, heads, keep, cols)
    mask = torch.gather(mask, 2, rows)
    columns = idx.view(batch, 1, 1, keep).expand(batch, heads, keep, keep)
    return torch.gather(mask, 3, columns)
