"""Pieces of the checkpoint format shared by every ZeRO stage: per-group JSON metadata, and cutting this
rank's flat shard out of whole (regathered) tensors when loading on any world size."""
from __future__ import annotations

from typing import Any

import torch
from ds_core.logging import warn_once

from ds_train.zero.partition import GroupLayout


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
