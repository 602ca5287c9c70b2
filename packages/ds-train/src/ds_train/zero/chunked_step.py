"""Stepping an optimizer whose parameters are chunks (views) of an fp32 master shard, a batch at a time.

Handing the optimizer one whole flat shard makes every per-parameter temporary of its update (torch
Adam's `denom`, ...) and the fp32 copy of a low-precision gradient as large as the shard, all alive at
the step's peak. With chunks of about `STEP_CHUNK` elements stepped one batch at a time, the fp32
gradients live in one batch-sized staging buffer and the temporaries are chunk-sized. Elementwise
optimizers give the same result either way. Used by stages 0-2 (`stage1_2.py`) and 3 (`stage3.py`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["STEP_CHUNK", "MAX_STEP_CALLS", "chunk_size", "batch_by_size", "usable_as_is", "step_batch",
           "is_state_tensor", "nonfinite_flag", "sum_of_squares"]

#: elements stepped per optimizer call when gradients need an fp32 copy (1 MiB of fp32 at a time: small
#: enough that the copies reuse freed heap blocks instead of growing the heap; -10 to -40 MiB peak RSS
#: per rank than 16 MiB chunks for a 20M GPT-2 in bf16 at stage 0, at the same step time) ...
STEP_CHUNK = 1 << 18
#: ... unless that would take more calls than this per step (huge shards: larger chunks, bounded overhead)
MAX_STEP_CALLS = 64


def chunk_size(shard_numel: int, step_chunk: int = STEP_CHUNK) -> int:
    """Elements per optimizer parameter for a shard of `shard_numel` elements."""
    return max(step_chunk, -(-shard_numel // MAX_STEP_CALLS))


def batch_by_size(sizes: Sequence[int], limit: int = STEP_CHUNK) -> list[list[int]]:
    """Indices of `sizes` in consecutive batches of at most `limit` elements (a larger item alone)."""
    batches: list[list[int]] = []
    size = limit
    for i, n in enumerate(sizes):
        if size + n > limit:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += n
    return batches


def usable_as_is(grad: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether `grad` can be the optimizer parameter's gradient without a copy (fp32, same device)."""
    return grad.dtype == torch.float32 and grad.device == param.device


def step_batch(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               inv: float) -> None:
    """Give `params` (optimizer parameters) their gradients `grads` scaled by `inv`, step, clear them.

    A gradient already fp32 on its parameter's device is used (and scaled) in place: callers zero their
    gradient buffers after the step. Others are copied into one staging buffer for the whole batch.
    Parameters of the optimizer outside `params` have no gradient and are skipped by its step.
    """
    need = sum(p.numel() for p, g in zip(params, grads) if not usable_as_is(g, p))
    staging = torch.empty(need, dtype=torch.float32, device=params[0].device) if need else None
    used = 0
    for p, src in zip(params, grads):
        if usable_as_is(src, p):
            g = src
        else:
            g = staging[used : used + src.numel()].copy_(src.reshape(-1))
            used += src.numel()
        if inv != 1.0:
            g.mul_(inv)
        p.grad = g.view(p.shape)
    try:
        optimizer.step()
    finally:
        for p in params:
            p.grad = None


def is_state_tensor(key: str, value: object, p: torch.Tensor) -> bool:
    """Per-element optimizer state (exp_avg, ...) as opposed to scalars kept as tensors (torch's `step`)."""
    return isinstance(value, torch.Tensor) and key != "step" and value.shape == p.shape


def nonfinite_flag(pieces: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 if any element of `pieces` is inf or nan, else 0.0, as a 1-element fp32 tensor on `device`
    (no host synchronisation per piece: the caller reduces it over ranks and reads it once)."""
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    for piece in pieces:
        bad = torch.maximum(bad, torch.logical_not(torch.isfinite(piece).all()).to(device, torch.float32))
    return bad


def sum_of_squares(pieces: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of all elements of `pieces`, accumulated in fp32 (no fp32 copy of a low-precision
    piece), as a 1-element tensor on `device`."""
    sumsq = torch.zeros(1, dtype=torch.float32, device=device)
    for piece in pieces:
        sumsq += torch.linalg.vector_norm(piece, dtype=torch.float32).square().to(device)
    return sumsq
