"""Automatic tensor parallelism: shard a transformers model's linears from its structure alone.

The rule (the one DeepSpeed's AutoTP uses): inside each decoder layer, every block of linears
(the attention module, the MLP module, or linears hanging directly off the layer) ends in the
linear that projects back to the hidden size; that one is *row*-parallel (input sharded, output
all-reduced), every other linear of the block is *column*-parallel (output sharded, no traffic).
Column shards are cut at head boundaries; fused projections (GPT-2's ``c_attn``, ``gate_up_proj``)
are cut per part so each rank keeps matching q/k/v heads. Fused MoE experts (3-D ``gate_up_proj``
/ ``down_proj`` parameters) are sharded along the intermediate dimension with one all-reduce.
Embeddings, norms, routers and the LM head are replicated.
"""

from __future__ import annotations

from typing import Any

import torch
from ds_core import comm
from torch import nn

from .layers import LinearAllreduce, MoEExpertsAllreduce, conv1d_to_linear, is_linear_like

__all__ = ["auto_tensor_parallel", "find_layer_list", "TPPlanError"]

#: projections that hold several equal parts side by side
_FUSED_PARTS = {"c_attn": 3, "qkv_proj": 3, "query_key_value": 3, "Wqkv": 3, "W_pack": 3, "gate_up_proj": 2}
#: per-module attributes that count heads or widths of the local shard
_HEAD_ATTRS = (
    "num_heads",
    "num_attention_heads",
    "num_key_value_heads",
    "n_head",
    "split_size",
    "all_head_size",
)


class TPPlanError(ValueError):
    """The model cannot be sharded ``tp_size`` ways (head counts or widths do not divide)."""


def find_layer_list(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the longest ModuleList of identical blocks."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise TPPlanError(f"{type(model).__name__} has no list of decoder layers to shard")
    return best


def _blocks_of(layer: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (parent, child_name) linears, each group ending in its output projection."""
    groups: list[list[tuple[nn.Module, str]]] = []
    direct: list[tuple[nn.Module, str]] = []
    for name, child in layer.named_children():
        if is_linear_like(child):
            direct.append((layer, name))
            continue
        found: list[tuple[nn.Module, str]] = []
        for sub in child.modules():
            for sub_name, leaf in sub.named_children():
                if is_linear_like(leaf):
                    found.append((sub, sub_name))
        if found:
            groups.append(found)
    if direct:
        groups.append(direct)
    return groups


def _split_rows(weight: torch.Tensor, parts: int, tp: int, rank: int, unit: int) -> torch.Tensor:
    """Rank's slice of dim 0 of ``weight`` (out features), cut per fused part at ``unit`` boundaries."""
    chunks = weight.chunk(parts, dim=0)
    out = []
    for chunk in chunks:
        rows = chunk.shape[0]
        if rows % (tp * unit):
            raise TPPlanError(
                f"cannot split {rows} output features into {tp} shards of whole heads ({unit} wide)"
            )
        size = rows // tp
        out.append(chunk[rank * size : (rank + 1) * size])
    return torch.cat(out, dim=0).contiguous()


def _head_unit(attn_like: nn.Module, default: int = 1) -> int:
    head_dim = getattr(attn_like, "head_dim", None)
    return int(head_dim) if isinstance(head_dim, int) else default


def _shard_moe_experts(module: nn.Module, tp: int, rank: int, group: Any) -> bool:
    """Shard fused 3-D expert weights along the intermediate dim; True if ``module`` is such a block."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3):
        return False
    inter = down.shape[-1]
    if inter % tp:
        raise TPPlanError(f"expert intermediate size {inter} is not divisible by tp_size={tp}")
    size = inter // tp
    gate, up = gate_up.data.chunk(2, dim=1)
    sl = slice(rank * size, (rank + 1) * size)
    module.gate_up_proj = nn.Parameter(
        torch.cat([gate[:, sl], up[:, sl]], dim=1).contiguous(), requires_grad=False
    )
    module.down_proj = nn.Parameter(down.data[:, :, sl].contiguous(), requires_grad=False)
    if hasattr(module, "intermediate_dim"):
        module.intermediate_dim = size
    return True


def _wrap_moe(layer: nn.Module, tp: int, rank: int, group: Any) -> int:
    count = 0
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if _shard_moe_experts(child, tp, rank, group):
                setattr(parent, name, MoEExpertsAllreduce(child, group))
                count += 1
    return count


def auto_tensor_parallel(model: nn.Module, tp_size: int, group: Any = None) -> dict[str, int]:
    """Shard ``model`` in place for this rank of ``group``; returns counts of what was sharded.

    Every rank must hold the same full weights before the call (load, or seed identically).
    """
    if tp_size == 1:
        return {"column": 0, "row": 0, "experts": 0}
    if not comm.is_initialized():
        raise TPPlanError("tensor_parallel.tp_size > 1 needs ds_core.comm.init_distributed() first")
    world = comm.get_world_size(group)
    if world != tp_size:
        raise TPPlanError(f"tensor_parallel.tp_size={tp_size} but the process group has {world} ranks")
    rank = comm.get_rank(group)
    counts = {"column": 0, "row": 0, "experts": 0}
    for layer in find_layer_list(model):
        counts["experts"] += _wrap_moe(layer, tp_size, rank, group)
        for block in _blocks_of(layer):
            if len(block) < 2:
                continue  # a lone linear (e.g. a router) stays replicated
            attn_like = block[0][0]
            unit = _head_unit(attn_like)
            for i, (parent, name) in enumerate(block):
                linear = conv1d_to_linear(getattr(parent, name))
                if i == len(block) - 1:
                    setattr(parent, name, LinearAllreduce.from_linear(linear, tp_size, rank, group, unit))
                    counts["row"] += 1
                else:
                    parts = _FUSED_PARTS.get(name, 1)
                    w = _split_rows(linear.weight.data, parts, tp_size, rank, unit)
                    new = nn.Linear(
                        w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype
                    )
                    new.weight = nn.Parameter(w, requires_grad=False)
                    if linear.bias is not None:
                        b = _split_rows(linear.bias.data[:, None], parts, tp_size, rank, unit)[:, 0]
                        new.bias = nn.Parameter(b, requires_grad=False)
                    setattr(parent, name, new)
                    counts["column"] += 1
            for attr in _HEAD_ATTRS:
                value = getattr(attn_like, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    if value % tp_size:
                        raise TPPlanError(
                            f"{type(attn_like).__name__}.{attr}={value} is not divisible by tp_size={tp_size}"
                        )
                    setattr(attn_like, attr, value // tp_size)
    if counts["row"] == 0 and counts["experts"] == 0:
        raise TPPlanError(f"found no linears to shard in {type(model).__name__}")
    return counts
