"""Tiny transformers models built from configs, shared by the ds-data tests."""

import pytest
import torch
import transformers

transformers.logging.set_verbosity_error()


def make_tiny(kind: str, layers: int = 4):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=layers,
            n_embd=32,
            n_head=4,
            vocab_size=97,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return transformers.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=layers,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=97,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        return transformers.BertForMaskedLM(cfg)
    raise ValueError(kind)


@pytest.fixture
def tiny_model():
    return make_tiny
