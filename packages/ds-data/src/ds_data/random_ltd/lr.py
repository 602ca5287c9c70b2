"""Learning rate driven by consumed layer-tokens rather than steps (random-LTD's companion schedule).

With random-LTD a step processes fewer layer-tokens early on, so decaying the LR by steps would
decay it too fast for the work done. This schedule warms up over `warmup_layer_tokens` and decays
over `total_layer_tokens` as counted by `RandomLTDScheduler.consumed_layer_tokens`, like Megatron's
``--lr-decay-tokens``. It returns a multiplier of the peak learning rate.
"""

from __future__ import annotations

import math

from ds_data.config import LayerTokenLRScheduleConfig

__all__ = ["LayerTokenLR"]


class LayerTokenLR:
    def __init__(self, config: LayerTokenLRScheduleConfig, total_layer_tokens: int) -> None:
        if total_layer_tokens < 1:
            raise ValueError(f"total_layer_tokens must be >= 1, got {total_layer_tokens}")
        if config.warmup_layer_tokens >= total_layer_tokens:
            raise ValueError(
                f"warmup_layer_tokens ({config.warmup_layer_tokens}) must be below total_layer_tokens ({total_layer_tokens})"
            )
        self.config = config
        self.total = total_layer_tokens

    def scale(self, consumed_layer_tokens: int) -> float:
        """Multiplier of the peak LR after `consumed_layer_tokens` layer-tokens."""
        cfg = self.config
        tokens = max(0, consumed_layer_tokens)
        if tokens < cfg.warmup_layer_tokens:
            if cfg.warmup_type == "log" and cfg.warmup_layer_tokens > 1:
                # DeepSpeed's WarmupLR log shape: log(t + 1) / log(warmup)
                return math.log(tokens + 1) / math.log(cfg.warmup_layer_tokens)
            return tokens / cfg.warmup_layer_tokens
        if cfg.decay_type == "constant":
            return 1.0
        progress = min(1.0, (tokens - cfg.warmup_layer_tokens) / (self.total - cfg.warmup_layer_tokens))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.decay_type == "cosine" else 1.0 - progress
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape
