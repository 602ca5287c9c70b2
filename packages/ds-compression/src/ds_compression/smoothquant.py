"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a linear carry values tens of times larger than the rest, so one range per
token spends most of the 8-bit grid on them. For each channel i, with a_i = max |x_i| over
calibration text and w_i = max |W[:, i]| over the linears reading x:

    s_i = a_i^alpha / w_i^(1 - alpha),   x_i -> x_i / s_i,   W[:, i] -> W[:, i] * s_i

which leaves the product unchanged. The division is folded into whatever writes x, so the model
computes exactly the same function in floating point and nothing is added at inference:

- q/k/v read `input_layernorm`, gate/up read `post_attention_layernorm`: divide the norm's weight;
- down_proj reads act(gate) * up: divide up_proj's output rows;
- o_proj reads softmax(QK) V: divide v_proj's output rows (with grouped-query attention, query heads
  sharing a KV head share one factor per channel, taken over the whole group).

Llama-style blocks (HF naming) are recognized; any other layout is an error naming what is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibration import observe_linear_inputs
from .model_utils import CompressionInputError, find_block_list

__all__ = ["smooth_activations", "SmoothGroup", "find_smooth_groups"]


@dataclass
class SmoothGroup:
    producer: nn.Module  # the norm (weight, maybe bias) or linear (output rows) writing x
    consumers: list[tuple[str, nn.Linear]]  # the linears reading x
    kv_repeat: int = 1  # > 1: producer is v_proj under GQA and x has kv_repeat copies of its channels
    head_dim: int = 0  # channels per head (needed when kv_repeat > 1)


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def find_smooth_groups(model: nn.Module) -> list[SmoothGroup]:
    prefix, blocks = find_block_list(model)
    groups = []
    for k, block in enumerate(blocks):
        name = f"{prefix}.{k}" if prefix else str(k)
        need = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        mods = {p: _get(block, p) for p in need}
        missing = [p for p, m in mods.items() if m is None]
        if missing:
            raise CompressionInputError(
                f"SmoothQuant supports Llama-style blocks; {name} has no {', '.join(missing)}"
            )
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(mods[norm], "weight", None), torch.Tensor):
                raise CompressionInputError(f"SmoothQuant: {name}.{norm} has no weight to fold the scales into")

        def lin(p: str, name: str = name, mods: dict = mods) -> tuple[str, nn.Linear]:
            return f"{name}.{p}", mods[p]

        q, v, o = mods["self_attn.q_proj"], mods["self_attn.v_proj"], mods["self_attn.o_proj"]
        repeat = o.in_features // v.out_features if v.out_features else 0
        if repeat < 1 or o.in_features != repeat * v.out_features or q.out_features != o.in_features:
            raise CompressionInputError(f"SmoothQuant: cannot map {name}.self_attn.o_proj inputs to v_proj outputs")
        head_dim = getattr(block.self_attn, "head_dim", None) or getattr(getattr(model, "config", None), "head_dim", None)
        if repeat > 1 and (not head_dim or v.out_features % head_dim):
            raise CompressionInputError(f"SmoothQuant: {name}.self_attn has grouped KV heads but no usable head_dim")
        groups += [
            SmoothGroup(mods["input_layernorm"], [lin("self_attn.q_proj"), lin("self_attn.k_proj"), lin("self_attn.v_proj")]),
            SmoothGroup(v, [lin("self_attn.o_proj")], kv_repeat=repeat, head_dim=head_dim or 0),
            SmoothGroup(mods["post_attention_layernorm"], [lin("mlp.gate_proj"), lin("mlp.up_proj")]),
            SmoothGroup(mods["mlp.up_proj"], [lin("mlp.down_proj")]),
        ]
    return groups


def _input_absmax(model: nn.Module, linears: dict[str, nn.Linear], batches: list[torch.Tensor]) -> dict:
    amax: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.abs().amax(0)
        amax[name] = torch.maximum(amax[name], x) if name in amax else x

    observe_linear_inputs(model, linears, batches, observe)
    return amax


@torch.no_grad()
def smooth_activations(
    model: nn.Module, batches: list[torch.Tensor], alpha: float, only: set[str] | None = None
) -> list[str]:
    """Fold SmoothQuant scales into `model` in place; returns the names of the smoothed linears.

    `only`: smooth a group when one of its readers is in this set (the activation-quantized linears).
    """
    if not 0.0 <= alpha <= 1.0:
        raise CompressionInputError(f"SmoothQuant alpha must be in [0, 1], got {alpha!r}")
    if not batches:
        raise CompressionInputError("SmoothQuant needs calibration data: pass calib_batches (or --calib <text file>)")
    groups = [g for g in find_smooth_groups(model) if only is None or any(n in only for n, _ in g.consumers)]
    readers = {n: m for g in groups for n, m in g.consumers[:1]}
    was_training = model.training
    model.eval()
    amax = _input_absmax(model, readers, batches)
    model.train(was_training)
    done = []
    for g in groups:
        a = amax[g.consumers[0][0]]
        w = torch.stack([m.weight.detach().float().abs().amax(0) for _, m in g.consumers]).amax(0)
        if g.kv_repeat > 1:  # one factor per KV channel: the max over the query heads sharing it
            a, w = (t.reshape(-1, g.kv_repeat, g.head_dim).amax(1).reshape(-1) for t in (a, w))
        s = _factors(a, w, alpha)
        _fold(g, s)
        done += [n for n, _ in g.consumers]
    return done


def _factors(a: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    s = a.clamp_min(1e-5) ** alpha / w.clamp_min(1e-5) ** (1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s))


def _fold(g: SmoothGroup, s: torch.Tensor) -> None:
    p = g.producer
    if isinstance(p, nn.Linear):  # output rows of the producer
        p.weight.div_(s.to(p.weight.dtype)[:, None])
        if p.bias is not None:
            p.bias.div_(s.to(p.bias.dtype))
    else:  # a norm's elementwise affine
        p.weight.div_(s.to(p.weight.dtype))
        if isinstance(getattr(p, "bias", None), torch.Tensor):
            p.bias.div_(s.to(p.bias.dtype))
    if g.kv_repeat > 1:
        s = s.reshape(-1, 1, g.head_dim).expand(-1, g.kv_repeat, g.head_dim).reshape(-1)
    for _, m in g.consumers:
        m.weight.mul_(s.to(m.weight.dtype)[None, :])
