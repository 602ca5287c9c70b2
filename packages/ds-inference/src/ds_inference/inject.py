"""Kernel injection: swap attention, MLP and norm modules for fused implementations.

What is fused (Llama-family models: Llama, Mistral, Qwen2, Mixtral):
- attention: q/k/v projections become one matmul over a concatenated weight, then rotary and one
  scaled-dot-product-attention call (flash/memory-efficient kernels where the device has them);
- gated MLP: gate and up projections become one matmul, the activation multiplies the halves;
- RMSNorm: one ``torch.nn.functional.rms_norm`` call instead of five elementwise ops.
ds-kernels provides no fused attention/MLP/norm op yet, so these are the torch paths. Outputs equal
the original modules' within float rounding (tests compare logits and greedy tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["inject_kernels", "FusedAttention", "FusedGatedMLP", "FusedRMSNorm", "INJECTABLE_MODEL_TYPES"]

INJECTABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    has_bias = linears[0].bias is not None
    fused = nn.Linear(
        weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype
    )
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias.data for lin in linears]), requires_grad=False)
    return fused


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 then back, as transformers' RMSNorm does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class FusedGatedMLP(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_up = _concat_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class FusedAttention(nn.Module):
    """Llama-style attention with one qkv matmul; follows the transformers layer calling convention."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.head_dim = attn.head_dim
        self.q_size, self.kv_size = attn.q_proj.out_features, attn.k_proj.out_features
        self.qkv = _concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.layer_idx = attn.layer_idx
        self.scaling = attn.scaling
        self.sliding_window = getattr(attn, "sliding_window", None)
        self.config = attn.config
        self.is_causal = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        b, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(b, t, -1, self.head_dim).transpose(1, 2)
        k = k.view(b, t, -1, self.head_dim).transpose(1, 2)
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = (e.unsqueeze(1) for e in position_embeddings)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        mask = None if attention_mask is None else attention_mask[:, :, :, : k.shape[-2]]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and t > 1,
            scale=self.scaling,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


def inject_kernels(model: nn.Module) -> dict[str, int]:
    """Replace modules in place; returns how many of each kind were replaced."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in INJECTABLE_MODEL_TYPES:
        raise ValueError(
            f"replace_with_kernel_inject supports model types {', '.join(INJECTABLE_MODEL_TYPES)}; "
            f"got {model_type!r} (run it without kernel injection)"
        )
    counts = {"attention": 0, "mlp": 0, "norm": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = type(child).__name__
            if cls.endswith("RMSNorm"):
                setattr(parent, name, FusedRMSNorm(child))
                counts["norm"] += 1
            elif cls.endswith("Attention") and all(hasattr(child, p) for p in ("q_proj", "k_proj", "v_proj")):
                if not all(isinstance(getattr(child, p), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
                    continue  # already sharded or quantized in a way we cannot concatenate
                setattr(parent, name, FusedAttention(child))
                counts["attention"] += 1
            elif all(
                isinstance(getattr(child, p, None), nn.Linear) for p in ("gate_proj", "up_proj")
            ) and hasattr(child, "down_proj"):
                setattr(parent, name, FusedGatedMLP(child))
                counts["mlp"] += 1
    return counts
