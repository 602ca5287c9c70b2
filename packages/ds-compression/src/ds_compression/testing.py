"""Tiny models and checks shared by this package's tests (and usable by downstream packages' tests)."""
from __future__ import annotations

import torch


def make_llama(layers: int = 2, seed: int = 0, vocab: int = 256) -> torch.nn.Module:
    """A randomly initialized Llama (hidden 64, 4 heads / 2 KV heads, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def make_bert(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A randomly initialized BERT encoder (hidden 64, 4 heads, vocab 100)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=64)
    return BertModel(cfg).eval()


def state_snapshot(model: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, snapshot: dict) -> None:
    """Fails if any tensor of `model` differs from `snapshot` (the never-modify-the-input rule)."""
    now = model.state_dict()
    assert now.keys() == snapshot.keys(), "input model's structure was modified"
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"input model was modified at {k}"
