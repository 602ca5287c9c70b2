"""Ragged forward passes over the weights of a transformers causal LM.

The serving engine does not call ``model.forward``: it flattens the tokens of every scheduled
sequence into one ragged batch ``(T, hidden)``, runs the model's own submodules (embeddings,
projections, norms, MLP/MoE blocks) on it, and delegates attention to a callback that reads and
writes the paged KV cache. One adapter per family describes where the submodules live; every
architecture of a family (Llama, Mistral, Qwen2, Mixtral, SmolLM2 ...) shares one adapter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionFn", "ModelAdapter", "get_adapter", "SUPPORTED_MODEL_TYPES"]

#: attention(layer_index, q (T,Hq,D), k (T,Hkv,D), v (T,Hkv,D), scale) -> (T, Hq, D)
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_LLAMA_LIKE = ("llama", "mistral", "qwen2", "mixtral")
SUPPORTED_MODEL_TYPES = (*_LLAMA_LIKE, "gpt2", "opt")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelAdapter:
    """Where a family keeps its parts, and how one decoder layer runs on a ragged batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- cache geometry -------------------------------------------------------------------
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def sliding_window(self, layer_index: int) -> int | None:
        return None

    # --- forward pieces ---------------------------------------------------------------------
    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Embeddings of the ragged tokens; may cache per-step tensors (rotary tables)."""
        raise NotImplementedError

    def layer(self, index: int, hidden: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.prepare(input_ids, positions)
        for i in range(self.num_layers):
            hidden = self.layer(i, hidden, attention)
        return self.logits(hidden[logits_indices])


class LlamaLikeAdapter(ModelAdapter):
    """Llama, Mistral, Qwen2, Mixtral: pre-norm RMSNorm, rotary q/k, separate q/k/v projections."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        base = model.model
        self.embed_tokens, self.layers, self.norm, self.rotary = (
            base.embed_tokens,
            base.layers,
            base.norm,
            base.rotary_emb,
        )
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn.head_dim
        # kernel injection fuses q/k/v into one `qkv` linear (ds_inference.inject.FusedAttention)
        kv_width = attn.kv_size if hasattr(attn, "qkv") else attn.k_proj.out_features
        self.num_kv_heads = kv_width // attn.head_dim
        self._cos = self._sin = None

    def sliding_window(self, layer_index: int) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return window if layer_types[layer_index] == "sliding_attention" else None
        return window

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(hidden[None], positions[None])
        self._cos, self._sin = cos[0, :, None, :], sin[0, :, None, :]
        return hidden

    def layer(self, index: int, hidden: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        layer = self.layers[index]
        attn = layer.self_attn
        tokens, d = hidden.shape[0], self.head_dim
        h = layer.input_layernorm(hidden)
        if hasattr(attn, "qkv"):
            q, k, v = attn.qkv(h).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q, k, v = q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d)
        q = q * self._cos + _rotate_half(q) * self._sin
        k = k * self._cos + _rotate_half(k) * self._sin
        out = attention(index, q, k, v, attn.scaling)
        hidden = hidden + attn.o_proj(out.reshape(tokens, -1))
        mlp_out = layer.mlp(layer.post_attention_layernorm(hidden)[None])
        if isinstance(mlp_out, tuple):  # some MoE blocks also return router logits
            mlp_out = mlp_out[0]
        return hidden + mlp_out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


class GPT2Adapter(ModelAdapter):
    """GPT-2: learned positions, fused c_attn (Conv1D), LayerNorm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if getattr(cfg, flag, False):
                raise ValueError(f"GPT-2 option {flag}=True is not supported by the ragged serving path")
        self.tf = model.transformer
        self.layers = self.tf.h
        self.lm_head = model.lm_head
        attn = self.layers[0].attn
        self.num_layers = len(self.layers)
        self.head_dim = attn.head_dim
        self.num_kv_heads = attn.split_size // attn.head_dim

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tf.wte(input_ids) + self.tf.wpe(positions)

    def layer(self, index: int, hidden: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        layer = self.layers[index]
        attn = layer.attn
        tokens, d = hidden.shape[0], self.head_dim
        q, k, v = attn.c_attn(layer.ln_1(hidden)).split(attn.split_size, dim=-1)
        out = attention(
            index, q.view(tokens, -1, d), k.view(tokens, -1, d), v.view(tokens, -1, d), attn.scaling
        )
        hidden = hidden + attn.c_proj(out.reshape(tokens, -1))
        return hidden + layer.mlp(layer.ln_2(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.tf.ln_f(hidden))


class OPTAdapter(ModelAdapter):
    """OPT: learned positions with offset 2, pre- or post-LayerNorm, optional in/out projections."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.dec = model.model.decoder
        self.layers = self.dec.layers
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.num_layers = len(self.layers)
        self.head_dim = attn.head_dim
        self.num_kv_heads = attn.k_proj.out_features // attn.head_dim

    def prepare(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.dec.embed_tokens(input_ids)
        if self.dec.project_in is not None:
            hidden = self.dec.project_in(hidden)
        pos = self.dec.embed_positions
        return hidden + F.embedding(positions + pos.offset, pos.weight)

    def layer(self, index: int, hidden: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        layer = self.layers[index]
        attn = layer.self_attn
        tokens, d = hidden.shape[0], self.head_dim
        pre = layer.do_layer_norm_before
        h = layer.self_attn_layer_norm(hidden) if pre else hidden
        q = (attn.q_proj(h) * attn.scaling).view(tokens, -1, d)
        k = attn.k_proj(h).view(tokens, -1, d)
        v = attn.v_proj(h).view(tokens, -1, d)
        hidden = hidden + attn.out_proj(attention(index, q, k, v, 1.0).reshape(tokens, -1))
        if not pre:
            hidden = layer.self_attn_layer_norm(hidden)
        h = layer.final_layer_norm(hidden) if pre else hidden
        hidden = hidden + layer.fc2(layer.activation_fn(layer.fc1(h)))
        if not pre:
            hidden = layer.final_layer_norm(hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.dec.final_layer_norm is not None:
            hidden = self.dec.final_layer_norm(hidden)
        if self.dec.project_out is not None:
            hidden = self.dec.project_out(hidden)
        return self.lm_head(hidden)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family; a clear error for an architecture we do not serve."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _LLAMA_LIKE:
        return LlamaLikeAdapter(model)
    if model_type == "gpt2":
        return GPT2Adapter(model)
    if model_type == "opt":
        return OPTAdapter(model)
    raise ValueError(
        f"model_type {model_type!r} is not supported by the ragged serving engine; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
