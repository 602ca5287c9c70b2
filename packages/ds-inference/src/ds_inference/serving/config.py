"""Configuration of the serving engine (cache geometry and scheduler limits)."""

from __future__ import annotations

from ds_core.config import DSConfigModel
from pydantic import Field

__all__ = ["ServingConfig"]


class ServingConfig(DSConfigModel):
    """Paged KV cache and Dynamic SplitFuse scheduler settings.

    FastGen (DeepSpeed-MII) calls the token budget ``max_ragged_batch_size`` and the sequence limit
    ``max_ragged_sequence_count``; both names are accepted as aliases.
    """

    block_size: int = Field(16, ge=1, description="Token positions per KV-cache block.")
    num_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks; None sizes the cache from kv_cache_gb."
    )
    kv_cache_gb: float = Field(
        1.0, gt=0, description="Memory for the KV cache when num_blocks is None (GiB)."
    )
    max_num_batched_tokens: int = Field(
        512,
        ge=1,
        alias="max_ragged_batch_size",
        description="Token budget of one forward pass (decode tokens + prompt chunks).",
    )
    max_num_seqs: int = Field(
        64, ge=1, alias="max_ragged_sequence_count", description="Sequences running at once."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Longest prompt + output; None uses the model's max_position_embeddings."
    )
    enable_prefix_caching: bool = Field(
        True, description="Share cached KV blocks of identical prompt prefixes."
    )
    max_queue_size: int = Field(
        256, ge=1, description="Requests waiting or running before new ones are refused."
    )
