"""Apply a sequence-length difficulty to a batch: truncate it, or reshape it into shorter rows.

A batch is a tensor ``[B, T, ...]``, a tuple/list of tensors, or a dict (e.g. ``input_ids``,
``labels``, ``attention_mask``, ``position_ids``). The sequence length ``T`` is taken from
``input_ids`` (or the first tensor with at least two dimensions); every tensor whose dim 1 equals
``T`` is cut along dim 1, and square 4-D masks ``[B, h, T, T]`` are cut on both of their last dims.
Everything else passes through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["batch_seqlen", "reshape_batch", "truncate_batch"]


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        if isinstance(batch.get("input_ids"), torch.Tensor):
            return [batch["input_ids"]]
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    return []


def _find_seqlen(batch: Any) -> int | None:
    for t in _tensors(batch):
        if t.dim() >= 2:
            return int(t.shape[1])
    return None


def batch_seqlen(batch: Any) -> int:
    """The sequence length T of a batch (see the module docstring)."""
    seqlen = _find_seqlen(batch)
    if seqlen is None:
        raise TypeError(
            f"cannot find a sequence dimension in a batch of type {type(batch).__name__}: expected a tensor "
            "[B, T, ...], a tuple/list of tensors, or a dict with 'input_ids'"
        )
    return seqlen


def _map(batch: Any, fn) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(None, batch)
    if isinstance(batch, Mapping):
        out = {k: fn(k, v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return out if type(batch) is dict else type(batch)(out)
    return type(batch)(fn(None, v) if isinstance(v, torch.Tensor) else v for v in batch)


def truncate_batch(batch: Any, seqlen: int) -> Any:
    """Keep the first `seqlen` positions of every sequence tensor.

    A no-op when the batch is not longer, or holds no tensor with a sequence dimension (e.g. a
    micro-batch's keyword arguments without tensors)."""
    full = _find_seqlen(batch)
    if full is None or seqlen >= full:
        return batch

    def cut(_key, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-1] == full and t.shape[-2] == full:
            return t[:, :, :seqlen, :seqlen]
        if t.dim() >= 2 and t.shape[1] == full:
            return t[:, :seqlen]
        return t

    return _map(batch, cut)


def reshape_batch(batch: Any, seqlen: int) -> Any:
    """Fold ``[B, T]`` into ``[B * (T // seqlen), seqlen]`` so every token still trains at the shorter length.

    Tokens past the last full row (``T % seqlen`` per sequence) are dropped; ``position_ids`` restart at
    0 in every new row. A square 4-D attention mask cannot be folded and raises an error.
    """
    full = _find_seqlen(batch)
    if full is None or seqlen >= full:
        return batch
    rows = full // seqlen
    keep = rows * seqlen

    def fold(key, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4 and t.shape[-1] == full and t.shape[-2] == full:
            raise ValueError(
                f"seqlen_reshape cannot fold a 4-D attention mask{f' ({key!r})' if key else ''}; pass a 2-D padding "
                "mask or use seqlen_truncate"
            )
        if t.dim() < 2 or t.shape[1] != full:
            return t
        folded = t[:, :keep].reshape(t.shape[0] * rows, seqlen, *t.shape[2:])
        if key == "position_ids":
            folded = torch.arange(seqlen, device=t.device, dtype=t.dtype).expand_as(folded).contiguous()
        return folded

    return _map(batch, fold)
