"""Shared pieces of the ZeRO benchmarks: a ~20M-parameter GPT-2 (transformers, from a config) and batches."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

VOCAB = 8192


def gpt(n_embd: int = 512, n_layer: int = 5, seq: int = 128, seed: int = 0) -> torch.nn.Module:
    """GPT-2 with ~20M parameters (n_embd 512, 5 layers, vocab 8192), dropout off for determinism."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=seq,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def batch(step: int, rank: int, micro: int = 4, seq: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * step + rank)
    return torch.randint(0, VOCAB, (micro, seq), generator=g)


def timed_steps(step_fn: Callable[[int], Any], warmup: int, steps: int) -> float:
    """Median seconds per call of step_fn(i) after `warmup` calls."""
    for i in range(warmup):
        step_fn(i)
    times = []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        step_fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ds_config(stage: int, dtype: str = "bf16", bucket: int = 500_000_000, micro: int = 4) -> dict:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
            "overlap_comm": True,
        },
    }
    if dtype != "fp32":
        cfg[dtype] = {"enabled": True}
    return cfg
