"""Test helpers: tiny random-weight models of each supported family and the transformers reference.

Used by the package tests and the benchmarks; nothing here is needed to serve a model.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 128


def tiny_config(family: str, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, max_position_embeddings=256)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **common,
    )
    if family == "llama":
        cfg = LlamaConfig(**llama_like)
    elif family == "mistral":
        cfg = MistralConfig(sliding_window=None, **llama_like)
    elif family == "qwen2":
        cfg = Qwen2Config(**llama_like)
    elif family == "mixtral":
        cfg = MixtralConfig(num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **llama_like)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    elif family == "opt":
        cfg = OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        )
    else:
        raise ValueError(family)
    # larger weights than the default 0.02 give peaked logits, so greedy ties cannot flip on rounding
    cfg.initializer_range = 0.2
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    return cfg


def tiny_model(family: str, seed: int = 0, vocab: int = VOCAB):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers generate(), one prompt at a time (no padding), greedy."""
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))
    return out[0, len(prompt) :].tolist()


def random_prompts(lengths, seed: int = 1, vocab: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "opt", "mixtral"]
