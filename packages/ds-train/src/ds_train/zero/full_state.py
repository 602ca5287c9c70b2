"""DeepSpeed's `safe_get_full_*` / `safe_set_full_*`: whole fp32 values of one partitioned parameter.

Each is a collective over the parameter's data-parallel group (every rank calls it with the same
parameter) and returns the whole tensor on every rank. Under ZeRO-3 the values come from the fp32
master shard, the reduced gradient shard (between backward and step) and the optimizer state
(device, host or NVMe); under ZeRO stages 0-2 from the same three, laid out by the stage's flat
buckets (see `zero/stage1_2_full_state.py`); a parameter no engine trains returns its own values.
Setters take the whole tensor (identical on every rank) and store this rank's piece.
"""
from __future__ import annotations

from typing import Any

import torch
from ds_core import comm

from ds_train.zero import stage1_2_full_state as _zero12

__all__ = [
    "safe_get_full_fp32_param", "safe_set_full_fp32_param",
    "safe_get_full_grad", "safe_set_full_grad",
    "safe_get_full_optimizer_state", "safe_set_full_optimizer_state",
]


def _owner(param: torch.nn.Parameter) -> Any:
    return getattr(param, "ds_owner", None)


def _piece(owner: Any, rec: Any, kind: str, key: str | None) -> torch.Tensor:
    """This rank's fp32 piece of `rec` for kind 'fp32' | 'grad' | 'state'."""
    lo, n, gi = rec.shard_offset, rec.shard_numel, rec.group
    if kind == "grad":
        return owner.grad_shards[gi][lo : lo + n].float()
    name = "fp32" if kind == "fp32" else key
    if owner.nvme_optimizer is not None:
        return owner.nvme_optimizer.read_range(gi, name, lo, n)
    if kind == "fp32":
        return owner.master[gi][lo : lo + n].float()
    return owner.optimizer_state_range(gi, key, lo, n)  # the state is kept in chunks of the shard


def _store(owner: Any, rec: Any, kind: str, key: str | None, piece: torch.Tensor) -> None:
    lo, n, gi = rec.shard_offset, rec.shard_numel, rec.group
    if kind == "grad":
        owner.grad_shards[gi][lo : lo + n].copy_(piece)
        return
    name = "fp32" if kind == "fp32" else key
    if owner.nvme_optimizer is not None:
        owner.nvme_optimizer.write_range(gi, name, lo, piece)
    elif kind == "fp32":
        owner.master[gi][lo : lo + n].copy_(piece)
    else:
        owner.set_optimizer_state_range(gi, key, lo, piece)
    if kind == "fp32":  # the model-dtype shard follows the master weights
        owner.tier.write_group(gi, lo, piece.to(owner.dtype))
        owner.gatherer.release(rec, force=True)
        if rec.persistent:
            owner.gatherer.gather([rec])


def _get(param: torch.nn.Parameter, kind: str, key: str | None = None) -> torch.Tensor | None:
    owner = _owner(param)
    if owner is None and (zero12 := _zero12.owner_of(param)) is not None:
        return _zero12.get_full(zero12, param, kind, key)
    if owner is None:
        if hasattr(param, "ds3"):
            raise ValueError("this parameter was partitioned by zero.Init but no engine owns it yet")
        if kind == "grad":
            return None if param.grad is None else param.grad.detach().float().clone()
        if kind == "fp32":
            return param.detach().float().clone()
        raise ValueError("optimizer state needs a parameter trained by a ZeRO engine (any stage)")
    rec = param.ds3
    piece = _piece(owner, rec, kind, key).contiguous()
    if owner.parts > 1:
        full = torch.empty(piece.numel() * owner.parts, dtype=piece.dtype, device=piece.device)
        comm.all_gather_into_tensor(full, piece, group=owner.group)
    else:
        full = piece.clone()
    return full[: rec.numel].view(rec.shape).cpu().clone()


def _set(param: torch.nn.Parameter, value: torch.Tensor, kind: str, key: str | None = None) -> None:
    owner = _owner(param)
    if owner is None and (zero12 := _zero12.owner_of(param)) is not None:
        _zero12.set_full(zero12, param, value, kind, key)
        return
    if owner is None:
        if kind == "fp32":
            with torch.no_grad():
                param.copy_(value)
            return
        if kind == "grad":
            param.grad = value.to(param.dtype).clone()
            return
        raise ValueError("optimizer state needs a parameter trained by a ZeRO engine (any stage)")
    rec = param.ds3
    if tuple(value.shape) != rec.shape:
        raise ValueError(f"'{rec.name}' has shape {rec.shape}; got a value of shape {tuple(value.shape)}")
    flat = value.detach().reshape(-1).float().to(owner.device)
    lo = owner.rank * rec.shard_numel
    piece = torch.zeros(rec.shard_numel, dtype=torch.float32, device=owner.device)
    part = flat[lo : min(lo + rec.shard_numel, rec.numel)]
    piece[: part.numel()].copy_(part)
    _store(owner, rec, kind, key, piece)


def safe_get_full_fp32_param(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master weight of `param`."""
    return _get(param, "fp32")


def safe_set_full_fp32_param(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Replace the fp32 master weight (and the model-dtype copy) of `param` by `value`."""
    _set(param, value, "fp32")


def safe_get_full_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The whole averaged gradient of `param` (call between the boundary backward and step; under fp16
    it still carries the loss scale, as DeepSpeed's does)."""
    return _get(param, "grad")


def safe_set_full_grad(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Replace the reduced gradient of `param` before the step."""
    _set(param, value, "grad")


def safe_get_full_optimizer_state(param: torch.nn.Parameter, optim_state_key: str) -> torch.Tensor:
    """The whole optimizer state `optim_state_key` ('exp_avg', 'exp_avg_sq', ...) of `param`."""
    return _get(param, "state", optim_state_key)


def safe_set_full_optimizer_state(param: torch.nn.Parameter, value: torch.Tensor, optim_state_key: str) -> None:
    """Replace the optimizer state `optim_state_key` of `param` by `value`."""
    _set(param, value, "state", optim_state_key)
