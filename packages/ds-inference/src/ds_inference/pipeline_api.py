"""``pipeline(model)``: the serving engine behind one call, like DeepSpeed-MII's ``mii.pipeline``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .loading import load_model_and_tokenizer
from .serving import LLMEngine, SamplingParams, ServingConfig

__all__ = ["Pipeline", "Response", "pipeline"]


@dataclass
class Response:
    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str
    token_ids: list[int]

    def __str__(self) -> str:
        return self.generated_text


class Pipeline:
    """Call it with prompts; requests run together with continuous batching."""

    def __init__(self, engine: LLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer

    def __call__(
        self, prompts: str | list[str] | list[list[int]], max_new_tokens: int = 128, **sampling: Any
    ) -> list[Response]:
        """Generate for each prompt. ``sampling``: temperature, top_k, top_p, repetition_penalty, seed,
        stop, stop_token_ids, ignore_eos (see SamplingParams)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        params = SamplingParams(max_tokens=max_new_tokens, **sampling)
        outs = self.engine.generate(list(prompts), params)
        return [
            Response(o.text, o.prompt_tokens, len(o.token_ids), o.finish_reason or "", o.token_ids)
            for o in outs
        ]


def pipeline(
    model: str | os.PathLike | nn.Module,
    tokenizer: Any = None,
    config: ServingConfig | dict | None = None,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
) -> Pipeline:
    """Build the serving engine for a local model directory (or a loaded model + tokenizer)."""
    loaded, tok, name = load_model_and_tokenizer(model, tokenizer, dtype, gguf_file)
    return Pipeline(LLMEngine(loaded, tok, config), name)
