"""Pieces of the checkpoint format shared by every ZeRO stage: per-group JSON metadata, cutting this
rank's flat shard out of whole (regathered) tensors when loading on any world size, and moving the state
of an optimizer whose parameters are chunks of the shard to and from shard-shaped tensors."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from ds_core.logging import warn_once

from ds_train.zero.chunked_step import is_state_tensor
from ds_train.zero.partition import GroupLayout
from ds_train.zero.strategy import ShardReader


def jsonable(value: Any) -> Any:
    """Optimizer hyperparameters and scalar state as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    warn_once(f"checkpoint: optimizer value of type {type(value).__name__} saved as its string form")
    return str(value)


def group_meta(param_group: dict[str, Any], scalars: dict[str, Any], state_keys: list[str]) -> dict[str, Any]:
    """The JSON metadata saved for one param group: hyperparameters, scalar optimizer state, tensor keys."""
    hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in param_group.items() if k != "params"}
    return {"hyperparams": jsonable(hyper), "scalar_state": jsonable(scalars), "state_keys": sorted(state_keys)}


def shard_from_full(layout: GroupLayout, part: int, full: dict[str, torch.Tensor], what: str) -> torch.Tensor:
    """Shard `part` of a group's flat fp32 buffer, cut from whole per-parameter tensors `full`."""
    out = torch.zeros(layout.shard_numel, dtype=torch.float32)
    for piece in layout.pieces(part):
        slot = layout.slots[piece.param]
        tensor = full.get(slot.name)
        if tensor is None:
            raise ValueError(f"checkpoint has no '{what}' for parameter '{slot.name}'")
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"checkpoint '{what}' of '{slot.name}' has shape {tuple(tensor.shape)}, model has {slot.shape}"
            )
        out[piece.shard_offset : piece.shard_offset + piece.length] = \
            tensor.reshape(-1)[piece.param_offset : piece.param_offset + piece.length]
    return out


def chunk_state_tensors(optimizer: torch.optim.Optimizer, opt_params: Sequence[torch.Tensor],
                        ranges: Sequence[tuple[int, int]], shard_numel: int
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One shard-sized fp32 tensor per state key from the optimizer parameters (chunk k covers shard
    elements ranges[k]), and the scalar state (the same in every chunk: they are stepped together)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for p, (lo, hi) in zip(opt_params, ranges, strict=True):
        for key, value in optimizer.state.get(p, {}).items():
            if is_state_tensor(key, value, p):
                buf = tensors.setdefault(key, torch.zeros(shard_numel, dtype=torch.float32))
                buf[lo:hi] = value.detach().reshape(-1).float().cpu()
            else:
                scalars.setdefault(key, value.item() if isinstance(value, torch.Tensor) else value)
    return tensors, scalars


def check_groups_match(reader: ShardReader, layouts: Sequence[GroupLayout]) -> None:
    """Refuse a checkpoint whose param groups or parameter names differ from the model's, before anything
    is loaded (so a mismatch changes nothing)."""
    if reader.group_count() != len(layouts):
        raise ValueError(f"checkpoint has {reader.group_count()} param groups, this engine has {len(layouts)}")
    for gi, layout in enumerate(layouts):
        names, saved = [s.name for s in layout.slots], reader.param_names(gi)
        if sorted(saved) != sorted(names):
            raise ValueError(
                f"param group {gi} does not match the checkpoint: missing from checkpoint "
                f"{sorted(set(names) - set(saved))[:5]}, not in model {sorted(set(saved) - set(names))[:5]}")


def restore_hyperparams(param_group: dict[str, Any], meta: dict[str, Any]) -> None:
    """The saved hyperparameters of one group (lr, betas, ...) back into the optimizer's param group."""
    for k, v in meta.get("hyperparams", {}).items():
        if k in param_group:
            param_group[k] = tuple(v) if isinstance(param_group[k], tuple) else v


def restore_chunk_states(optimizer: torch.optim.Optimizer, opt_params: Sequence[torch.Tensor],
                         ranges: Sequence[tuple[int, int]], states: dict[str, torch.Tensor],
                         scalars: dict[str, Any]) -> None:
    """The inverse of `chunk_state_tensors`: cut each chunk's state out of the shard-sized tensors."""
    for p, (lo, hi) in zip(opt_params, ranges, strict=True):
        state = optimizer.state[p]
        state.clear()
        for key, value in states.items():
            state[key] = value[lo:hi].view(p.shape).to(device=p.device, dtype=p.dtype).clone()
        for key, value in scalars.items():
            state[key] = _restore_scalar(optimizer, key, value)


def _restore_scalar(optimizer: torch.optim.Optimizer, key: str, value: Any) -> Any:
    """torch optimizers keep `step` as a float tensor; ds-kernels' keep an int."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)) and key == "step":
        return torch.tensor(float(value), dtype=torch.float32)
    if key == "step":
        return int(value)
    return value
