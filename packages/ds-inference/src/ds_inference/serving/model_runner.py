"""Turns scheduled chunks into one ragged forward pass and returns the logits that sample."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import get_adapter
from .paged_attention import AttentionBatch, PagedKVCache, SeqSlice
from .scheduler import ScheduledChunk

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int) -> None:
        self.model = model.eval()
        self.adapter = get_adapter(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        a = self.adapter
        self.cache = PagedKVCache(
            a.num_layers, num_blocks, block_size, a.num_kv_heads, a.head_dim, self.dtype, self.device
        )
        self.block_size = block_size

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits (one row per chunk that samples, in chunk order) after writing every chunk's K/V."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_slices: list[SeqSlice] = []
        logits_rows: list[int] = []
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            table = seq.block_table
            row = len(ids)
            ids.extend(seq.token_ids[start : start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            seq_slices.append(SeqSlice(row, n, start + n, table[: -(-(start + n) // bs)]))
            if chunk.samples:
                logits_rows.append(row + n - 1)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        attention = AttentionBatch(
            self.cache,
            seq_slices,
            torch.tensor(slots, dtype=torch.long, device=dev),
            self.adapter.sliding_window,
        )
        rows = torch.tensor(logits_rows, dtype=torch.long, device=dev)
        return self.adapter.forward(input_ids, pos_t, attention, rows)
