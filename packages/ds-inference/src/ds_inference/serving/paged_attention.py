"""The paged KV cache and attention over it for one ragged forward pass.

Cache layout per layer: ``(num_blocks, block_size, num_kv_heads, head_dim)``. New K/V rows are
scattered to their slots (``block * block_size + offset``); each sequence then reads its context
back by gathering whole blocks from its block table. Decoding sequences (one query token each)
are attended in one padded batch; prefill chunks one by one with a causal mask offset by the
tokens already in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PagedKVCache", "AttentionBatch", "SeqSlice"]


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2
            * num_layers
            * block_size
            * num_kv_heads
            * head_dim
            * torch.empty((), dtype=dtype).element_size()
        )


@dataclass
class SeqSlice:
    """Where one sequence's query rows sit in the ragged batch and what context it sees."""

    q_start: int  # row offset in the ragged batch
    q_len: int
    ctx_len: int  # tokens in the cache after this pass (cached + new)
    block_table: list[int]


class AttentionBatch:
    """Per-pass metadata; calling it runs attention for one layer (the adapter's AttentionFn)."""

    def __init__(
        self,
        cache: PagedKVCache,
        seqs: list[SeqSlice],
        slot_mapping: torch.Tensor,
        window_of_layer: Callable[[int], int | None],
    ) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping
        self.window_of_layer = window_of_layer
        bs = cache.block_size
        device = cache.k.device
        self.decodes = [s for s in seqs if s.q_len == 1]
        self.prefills = [s for s in seqs if s.q_len > 1]
        if self.decodes:
            max_blocks = max(len(s.block_table) for s in self.decodes)
            tables = torch.zeros(len(self.decodes), max_blocks, dtype=torch.long)
            for i, s in enumerate(self.decodes):
                tables[i, : len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.long)
            self.decode_tables = tables.to(device)
            self.decode_rows = torch.tensor([s.q_start for s in self.decodes], device=device)
            ctx = torch.tensor([s.ctx_len for s in self.decodes], device=device)
            self.decode_ctx = ctx
            self.decode_key_pos = torch.arange(max_blocks * bs, device=device)
            self.decode_mask = self.decode_key_pos[None, :] < ctx[:, None]  # (B, K)
        self.prefill_tables = [
            torch.tensor(s.block_table, dtype=torch.long, device=device) for s in self.prefills
        ]

    def _masks_for_window(self, window: int | None) -> torch.Tensor:
        mask = self.decode_mask
        if window is not None:  # query position is ctx-1; keys must satisfy k > q - window
            mask = mask & (self.decode_key_pos[None, :] > (self.decode_ctx[:, None] - 1 - window))
        return mask[:, None, None, :]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        num_blocks, bs, heads_kv, d = k_cache.shape
        flat_k, flat_v = k_cache.view(-1, heads_kv, d), v_cache.view(-1, heads_kv, d)
        flat_k.index_copy_(0, self.slot_mapping, k.to(flat_k.dtype))
        flat_v.index_copy_(0, self.slot_mapping, v.to(flat_v.dtype))
        out = torch.empty_like(q)
        gqa = q.shape[1] != heads_kv
        window = self.window_of_layer(layer)
        if self.decodes:
            b, nb = self.decode_tables.shape
            keys = k_cache[self.decode_tables].view(b, nb * bs, heads_kv, d).transpose(1, 2)
            vals = v_cache[self.decode_tables].view(b, nb * bs, heads_kv, d).transpose(1, 2)
            qd = q[self.decode_rows][:, :, None, :]  # (B, Hq, 1, D)
            o = F.scaled_dot_product_attention(
                qd,
                keys.to(q.dtype),
                vals.to(q.dtype),
                attn_mask=self._masks_for_window(window),
                scale=scale,
                enable_gqa=gqa,
            )
            out[self.decode_rows] = o[:, :, 0, :]
        for s, table in zip(self.prefills, self.prefill_tables, strict=True):
            keys = k_cache[table].view(-1, heads_kv, d)[: s.ctx_len].transpose(0, 1)[None]
            vals = v_cache[table].view(-1, heads_kv, d)[: s.ctx_len].transpose(0, 1)[None]
            qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1)[None]
            start = s.ctx_len - s.q_len
            if start == 0 and window is None:
                o = F.scaled_dot_product_attention(
                    qs, keys.to(q.dtype), vals.to(q.dtype), is_causal=True, scale=scale, enable_gqa=gqa
                )
            else:
                q_pos = torch.arange(start, s.ctx_len, device=q.device)[:, None]
                k_pos = torch.arange(s.ctx_len, device=q.device)[None, :]
                mask = k_pos <= q_pos
                if window is not None:
                    mask = mask & (k_pos > q_pos - window)
                o = F.scaled_dot_product_attention(
                    qs, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=gqa
                )
            out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
        return out
