"""The serving engine: requests in, one scheduled ragged forward pass per ``step()``, tokens out."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from ds_core.config import parse_config
from torch import nn

from .block_manager import BlockManager
from .config import ServingConfig
from .model_runner import ModelRunner
from .paged_attention import PagedKVCache
from .sampling import SamplingParams, sample_next_tokens
from .scheduler import Scheduler
from .sequence import Sequence

__all__ = ["LLMEngine", "RequestOutput", "QueueFullError"]


class QueueFullError(RuntimeError):
    """More requests than ``max_queue_size`` are waiting or running."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]  # all generated tokens so far
    text_delta: str = ""
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


class LLMEngine:
    """Continuous batching over a paged KV cache.

    >>> engine = LLMEngine(model, tokenizer)
    >>> rid = engine.add_request("Hello", SamplingParams(max_tokens=8))
    >>> while engine.has_unfinished(): outputs = engine.step()
    """

    def __init__(
        self, model: nn.Module, tokenizer: Any = None, config: ServingConfig | dict | str | None = None
    ) -> None:
        cfg = config if isinstance(config, ServingConfig) else parse_config(ServingConfig, config or {})
        self.config = cfg
        self.tokenizer = tokenizer
        self.model = model
        model_max = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        self.max_model_len = cfg.max_model_len or model_max or 2048
        if model_max and self.max_model_len > model_max:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's {model_max} positions")
        num_blocks = cfg.num_blocks
        if num_blocks is None:
            from ..arch import get_adapter

            a = get_adapter(model)
            dtype = next(model.parameters()).dtype
            per_block = PagedKVCache.bytes_per_block(
                a.num_layers, cfg.block_size, a.num_kv_heads, a.head_dim, dtype
            )
            num_blocks = max(1, int(cfg.kv_cache_gb * 2**30) // per_block)
        self.runner = ModelRunner(model, num_blocks, cfg.block_size)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.eos_ids = _eos_ids(model, tokenizer)
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._aborted: list[Sequence] = []
        self.stats = {"steps": 0, "forward_tokens": 0, "aborted": 0}

    # --- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer"
                )
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError("a prompt must be a string or a list of token ids (ints)")
        return list(prompt)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context is {self.max_model_len} tokens "
                f"(prompt + at least one generated token must fit)"
            )
        vocab = self.runner.adapter.config.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        if -(-total // self.blocks.block_size) > self.blocks.num_blocks:
            raise ValueError(
                f"a request of {total} tokens needs more KV blocks than the cache holds "
                f"({self.blocks.num_blocks} x {self.blocks.block_size}); raise num_blocks/kv_cache_gb"
            )
        if len(self._seqs) >= self.config.max_queue_size:
            raise QueueFullError(
                f"{len(self._seqs)} requests in flight (max_queue_size={self.config.max_queue_size})"
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in flight")
        seq = Sequence(request_id, ids, params)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are freed at once. False if it is unknown or already done."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._aborted.append(seq)
        self.stats["aborted"] += 1
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    @property
    def num_in_flight(self) -> int:
        return len(self._seqs)

    # --- one pass ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = [self._output(seq, []) for seq in self._aborted]
        self._aborted = []
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        logits = self.runner.run(chunks)
        self.stats["steps"] += 1
        self.stats["forward_tokens"] += sum(c.num_tokens for c in chunks)
        sampling = [c.seq for c in chunks if c.samples]
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
            self.blocks.register_full_blocks(chunk.seq)
        if not sampling:
            return outputs
        new_tokens = sample_next_tokens(
            logits,
            [s.params for s in sampling],
            [s.token_ids for s in sampling],
            [s.generator for s in sampling],
        )
        now = time.perf_counter()
        for seq, token in zip(sampling, new_tokens, strict=True):
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._seqs.pop(seq.request_id, None)
            outputs.append(self._output(seq, [token]))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self._hit_stop_string(seq):
            return "stop"
        if seq.num_output >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        text = self._decode(seq)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = text[: min(hits)]
            seq.stopped_by_string = True
            return True
        return False

    def _decode(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer; use stop_token_ids or give the engine a tokenizer"
            )
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        delta = ""
        if self.tokenizer is not None:
            if not seq.stopped_by_string:
                text = self._decode(seq)
                # hold back an incomplete UTF-8 character and anything that may start a stop string
                safe = len(text)
                if not seq.is_finished:
                    if text.endswith("\ufffd"):
                        safe = len(text.rstrip("\ufffd"))
                    if seq.params.stop:
                        safe = max(seq.text_sent, safe - max(len(s) for s in seq.params.stop) + 1)
                seq.text = text[:safe] if not seq.is_finished else text
            delta = seq.text[seq.text_sent :]
            seq.text_sent = len(seq.text)
        metrics = {}
        if seq.first_token_time is not None:
            metrics["ttft_s"] = seq.first_token_time - seq.arrival_time
        return RequestOutput(
            seq.request_id,
            new_tokens,
            list(seq.output_ids),
            delta,
            seq.text,
            seq.is_finished,
            seq.finish_reason,
            seq.prompt_len,
            seq.num_cached_prompt_tokens,
            metrics,
        )

    # --- offline batch ----------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion (continuous batching); outputs in prompt order."""
        if isinstance(params, list) and len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        per = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per, strict=True)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def reset_prefix_cache_stats(self) -> None:
        self.blocks.prefix_hits = 0

    def describe(self) -> str:
        cache = self.runner.cache
        return (
            f"LLMEngine(blocks={self.blocks.num_blocks}x{self.blocks.block_size}, "
            f"kv_cache={cache.nbytes / 2**20:.0f} MiB, budget={self.scheduler.token_budget} tokens, "
            f"max_seqs={self.scheduler.max_num_seqs}, max_model_len={self.max_model_len})"
        )
