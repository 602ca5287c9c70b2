"""Calibration batches from a text file: tokenized, cut into fixed-length sequences."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model_utils import CompressionInputError

__all__ = ["calibration_batches", "observe_linear_inputs", "text_token_ids"]


def text_token_ids(path: str | os.PathLike, tokenizer: Any, max_tokens: int | None = None) -> torch.Tensor:
    """All token ids of a UTF-8 text file (reading only as much text as `max_tokens` needs)."""
    p = Path(path)
    if not p.is_file():
        raise CompressionInputError(f"calibration text file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # a token is rarely longer than 8 characters
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(
    path: str | os.PathLike, tokenizer: Any, num_samples: int = 32, seq_len: int = 256, batch_size: int = 4
) -> list[torch.Tensor]:
    """`num_samples` sequences of `seq_len` consecutive tokens, grouped into batches of `batch_size`."""
    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        raise CompressionInputError("calibration needs num_samples >= 1, seq_len >= 2, batch_size >= 1")
    ids = text_token_ids(path, tokenizer, max_tokens=num_samples * seq_len)
    have = ids.numel() // seq_len
    if have == 0:
        raise CompressionInputError(f"calibration file {path} has fewer than {seq_len} tokens")
    seqs = ids[: min(have, num_samples) * seq_len].reshape(-1, seq_len)
    return list(seqs.split(batch_size))


@torch.no_grad()
def observe_linear_inputs(
    model: nn.Module, linears: dict[str, nn.Module], batches: list[torch.Tensor],
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Run the calibration batches through `model`, calling `observe(name, x)` with each chosen linear's
    input as a float (tokens, in_features) matrix; the hooks are removed afterwards, even on error."""

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            observe(name, args[0].detach().float().reshape(-1, args[0].shape[-1]))
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for batch in batches:
            model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
