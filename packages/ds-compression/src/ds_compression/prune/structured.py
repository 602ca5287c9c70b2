"""Structured post-training pruning that shrinks the model: MLP channels (rows of the up/gate
projections = columns of the down projection) and attention heads.

Layouts are found by module names: Llama-style (`mlp.{gate,up,down}_proj`, `self_attn.{q,k,v,o}_proj`)
and BERT-style (`intermediate.dense` -> `output.dense`, `attention.self.{query,key,value}` ->
`attention.output.dense`). Other layouts are rejected by name.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..history import record_attribute, record_method
from ..model_utils import CompressionInputError, set_module
from .masks import topk_keep_mask
from .surgery import keep_cols, keep_rows

__all__ = ["ChannelGroup", "HeadGroup", "find_mlp_channel_groups", "find_attention_head_groups",
           "prune_channels", "prune_heads"]


@dataclass
class ChannelGroup:
    """Hidden channels produced by `producers` (rows) and read by `consumer` (columns)."""

    producers: list[str]
    consumer: str


@dataclass
class HeadGroup:
    """One attention layer: q/k/v rows per head, output-projection columns per head."""

    module: str  # the module holding the head-count attributes
    query: str
    key: str
    value: str
    output: str
    head_dim: int
    num_heads: int
    num_kv_heads: int


def find_mlp_channel_groups(model: nn.Module) -> list[ChannelGroup]:
    groups = []
    names = {n for n, _ in model.named_modules()}
    for name in sorted(names):
        pre = f"{name}." if name else ""
        if {f"{pre}gate_proj", f"{pre}up_proj", f"{pre}down_proj"} <= names:
            groups.append(ChannelGroup([f"{pre}gate_proj", f"{pre}up_proj"], f"{pre}down_proj"))
        elif {f"{pre}intermediate.dense", f"{pre}output.dense"} <= names and f"{pre}attention" in names:
            groups.append(ChannelGroup([f"{pre}intermediate.dense"], f"{pre}output.dense"))
    if not groups:
        raise CompressionInputError(
            f"no MLP layout found in {type(model).__name__} for channel pruning "
            "(supported: Llama-style gate/up/down_proj, BERT-style intermediate.dense/output.dense)"
        )
    return groups


def find_attention_head_groups(model: nn.Module) -> list[HeadGroup]:
    groups = []
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            head_dim = getattr(mod, "head_dim", None)
            if head_dim is None:
                raise CompressionInputError(f"attention module '{name}' has no head_dim attribute")
            n_heads = mod.q_proj.out_features // head_dim
            n_kv = mod.k_proj.out_features // head_dim
            groups.append(HeadGroup(name, f"{pre}q_proj", f"{pre}k_proj", f"{pre}v_proj", f"{pre}o_proj",
                                    head_dim, n_heads, n_kv))
        elif hasattr(mod, "self") and hasattr(mod, "output") and hasattr(mod.self, "query") \
                and hasattr(mod.self, "attention_head_size") and hasattr(mod.output, "dense"):
            hd = mod.self.attention_head_size
            n = mod.self.query.out_features // hd
            groups.append(HeadGroup(f"{pre}self", f"{pre}self.query", f"{pre}self.key", f"{pre}self.value",
                                    f"{pre}output.dense", hd, n, n))
    if not groups:
        raise CompressionInputError(
            f"no attention layout found in {type(model).__name__} for head pruning "
            "(supported: Llama-style q/k/v/o_proj with head_dim, BERT-style self.query/key/value + output.dense)"
        )
    return groups


def _row_norms(model: nn.Module, names: list[str]) -> torch.Tensor:
    return sum(model.get_submodule(n).weight.detach().float().norm(dim=1) for n in names)


def prune_channels(model: nn.Module, *, ratio: float, groups: list[ChannelGroup] | None = None) -> nn.Module:
    """A smaller copy: each MLP loses `ratio` of its hidden channels, chosen by smallest
    ||producer rows|| * ||consumer column||."""
    if not 0.0 < ratio < 1.0:
        raise CompressionInputError(f"channel pruning ratio must be in (0, 1), got {ratio}")
    groups = groups or find_mlp_channel_groups(model)
    out = copy.deepcopy(model)
    kept_sizes = set()
    for g in groups:
        consumer = out.get_submodule(g.consumer)
        score = _row_norms(out, g.producers) * consumer.weight.detach().float().norm(dim=0)
        keep = max(1, int(round((1.0 - ratio) * score.numel())))
        index = torch.nonzero(topk_keep_mask(score, keep)).flatten()
        for p in g.producers:
            set_module(out, p, keep_rows(out.get_submodule(p), index))
        set_module(out, g.consumer, keep_cols(consumer, index))
        kept_sizes.add(keep)
    cfg = getattr(out, "config", None)
    if cfg is not None and hasattr(cfg, "intermediate_size") and len(kept_sizes) == 1:
        cfg.intermediate_size = kept_sizes.pop()
    record_method(out, {"method": "channel_prune", "ratio": ratio, "groups": len(groups)})
    return out


def head_scores(model: nn.Module, g: HeadGroup) -> torch.Tensor:
    """Per KV group: ||V rows of the head|| * ||O columns of the head||, summed over the group's heads."""
    v = model.get_submodule(g.value).weight.detach().float().reshape(g.num_kv_heads, -1).norm(dim=1)
    o = model.get_submodule(g.output).weight.detach().float()
    o_heads = o.reshape(o.shape[0], g.num_heads, g.head_dim).norm(dim=(0, 2))
    per_group = o_heads.reshape(g.num_kv_heads, -1).sum(dim=1)
    return v * per_group


def prune_heads(model: nn.Module, *, ratio: float, groups: list[HeadGroup] | None = None) -> nn.Module:
    """A smaller copy: each attention layer loses `ratio` of its heads (whole KV groups under GQA)."""
    if not 0.0 < ratio < 1.0:
        raise CompressionInputError(f"head pruning ratio must be in (0, 1), got {ratio}")
    groups = groups or find_attention_head_groups(model)
    out = copy.deepcopy(model)
    for g in groups:
        per_kv = g.num_heads // g.num_kv_heads
        keep = max(1, int(round((1.0 - ratio) * g.num_kv_heads)))
        kv_keep = torch.nonzero(topk_keep_mask(head_scores(out, g), keep)).flatten()
        q_heads = (kv_keep[:, None] * per_kv + torch.arange(per_kv)).flatten()
        q_idx = (q_heads[:, None] * g.head_dim + torch.arange(g.head_dim)).flatten()
        kv_idx = (kv_keep[:, None] * g.head_dim + torch.arange(g.head_dim)).flatten()
        set_module(out, g.query, keep_rows(out.get_submodule(g.query), q_idx))
        set_module(out, g.key, keep_rows(out.get_submodule(g.key), kv_idx))
        set_module(out, g.value, keep_rows(out.get_submodule(g.value), kv_idx))
        set_module(out, g.output, keep_cols(out.get_submodule(g.output), q_idx))
        holder = out.get_submodule(g.module)
        if hasattr(holder, "num_attention_heads"):
            record_attribute(out, g.module, "num_attention_heads", len(q_heads))
        if hasattr(holder, "all_head_size"):
            record_attribute(out, g.module, "all_head_size", len(q_heads) * g.head_dim)
    record_method(out, {"method": "head_prune", "ratio": ratio, "layers": len(groups)})
    return out
