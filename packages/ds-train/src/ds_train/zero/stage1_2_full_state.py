"""`safe_get_full_*` / `safe_set_full_*` for parameters trained by a ZeRO stage 0-2 engine (`ZeroStage012`).

A parameter's slot [offset, end) of its group's flat buffer lies inside one bucket, and may straddle
several ranks' pieces of that bucket. Each rank holds, for its own overlap with the slot:
- the fp32 master weights (`master[gi]`, shard coordinates; in fp32 the model's buffer itself),
- the reduced gradient: stage 2 in `grad_shard[gi]` (shard coordinates); stages 0/1 in `grad_full[gi]`
  (flat coordinates), where a stage-1 reduce-scatter (by collective or by sends) reduces and scales
  only this rank's piece, while stage 0 and stage 1 with an all-reduce hold the whole average,
- the optimizer state, per optimizer parameter: chunks of the shard (`_ranges[gi][k]`).
A getter puts this rank's overlap into a zero tensor of the slot's size and sums it over the group
(exact: every element comes from exactly one rank), as DeepSpeed's fragment mapping does.
Setters take the whole value (the same on every rank) and write this rank's overlap.

Gradients are returned as the step will read them: averaged over ranks and micro steps after the
accumulation boundary's backward, in fp16 still multiplied by the loss scale (DeepSpeed's too;
the step unscales). `ZeroStage012.__init__` registers its parameters here (`attach`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from ds_core import comm
from torch.utils.weak import WeakIdKeyDictionary

from ds_train.zero.chunked_step import is_state_tensor
from ds_train.zero.partition import ParamSlot

if TYPE_CHECKING:
    from ds_train.zero.stage1_2 import ZeroStage012

__all__ = ["attach", "owner_of", "get_full", "set_full"]

# parameter -> weak reference to the stage 0-2 strategy training it. A registry, not an attribute on the
# parameter: an attribute holding a (weak) reference would make torch.save(model) fail to pickle, and
# `ds_owner` is ZeRO-3's mark (zero.Init and the HF loader rely on it). Keys are weak too, so neither a
# dropped model nor a dropped engine is kept alive by it.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def attach(strategy: ZeroStage012) -> None:
    """Register every parameter of `strategy` as its own (a later engine on the same parameters wins)."""
    ref = weakref.ref(strategy)
    for params in strategy.params:
        for p in params:
            _OWNERS[p] = ref


def owner_of(param: torch.nn.Parameter) -> ZeroStage012 | None:
    """The live stage 0-2 strategy that trains `param`, or None."""
    ref = _OWNERS.get(param)
    return ref() if ref is not None else None


@dataclass(frozen=True)
class _Where:
    """Where this rank's part of one parameter lives."""

    group: int
    slot: ParamSlot
    flat_lo: int  # this rank's overlap with the slot, flat-buffer coordinates [flat_lo, flat_hi)
    flat_hi: int
    shard_lo: int  # where flat_lo lands in this rank's shard

    @property
    def numel(self) -> int:
        return self.flat_hi - self.flat_lo

    @property
    def in_param(self) -> slice:
        """The overlap as a range of the flattened parameter."""
        return slice(self.flat_lo - self.slot.offset, self.flat_hi - self.slot.offset)


def _where(owner: ZeroStage012, param: torch.nn.Parameter) -> _Where:
    gi, si, bi = owner._bucket_of[id(param)]
    layout = owner.layouts()[gi]
    slot, bucket = layout.slots[si], layout.buckets[bi]
    lo, hi = layout.piece_range(bucket, owner.part)  # with one part: the whole bucket
    a, z = max(lo, slot.offset), min(hi, slot.end)
    if a >= z:  # the slot lies wholly in other ranks' pieces
        a = z = lo
    return _Where(gi, slot, a, z, bucket.shard_offset + (a - lo))


def _grad_run(owner: ZeroStage012, w: _Where) -> torch.Tensor:
    """This rank's reduced gradient for the overlap (a view, in the gradient dtype)."""
    if owner.stage == 2:
        return owner.grad_shard[w.group][w.shard_lo : w.shard_lo + w.numel]
    return owner.grad_full[w.group][w.flat_lo : w.flat_hi]


def _state_runs(owner: ZeroStage012, w: _Where, key: str) -> list[tuple[slice, torch.Tensor]]:
    """(range of the overlap, view of optimizer state `key`) for each optimizer parameter it meets."""
    gi = w.group
    opt_params = owner._opt_params[gi]
    first = owner.optimizer.state.get(opt_params[0], {})
    # every rank checks the same thing before any collective, so a bad key fails everywhere, never hangs
    if not is_state_tensor(key, first.get(key), opt_params[0]):
        keys = sorted(k for k, v in first.items() if is_state_tensor(k, v, opt_params[0]))
        raise ValueError(
            f"'{w.slot.name}' has no per-element optimizer state '{key}'"
            + (f"; it has {keys}" if keys else " (the optimizer has not stepped yet)")
        )
    hi_w = w.shard_lo + w.numel
    runs = []
    for p, (lo, hi, _) in zip(opt_params, owner._ranges[gi]):
        a, z = max(lo, w.shard_lo), min(hi, hi_w)
        if a < z:
            state = owner.optimizer.state[p][key]
            runs.append((slice(a - w.shard_lo, z - w.shard_lo), state.view(-1)[a - lo : z - lo]))
    return runs


def _local(owner: ZeroStage012, w: _Where, kind: str, key: str | None) -> torch.Tensor:
    """This rank's fp32 values for the overlap."""
    if kind == "fp32":
        if owner.master[w.group] is owner.flat[w.group]:  # fp32: the master is the model's own buffer
            return owner.flat[w.group][w.flat_lo : w.flat_hi].float()
        return owner.master[w.group][w.shard_lo : w.shard_lo + w.numel].float()
    if kind == "grad":
        return _grad_run(owner, w).float()
    out = torch.zeros(w.numel, dtype=torch.float32)
    for where, state in _state_runs(owner, w, key):
        out[where] = state.float().cpu()
    return out


def get_full(
    owner: ZeroStage012, param: torch.nn.Parameter, kind: str, key: str | None = None
) -> torch.Tensor:
    """The whole fp32 value of `param` for kind 'fp32' | 'grad' | 'state' (a collective over the group)."""
    w = _where(owner, param)
    local = _local(owner, w, kind, key)
    if owner.parts == 1:  # stage 0: every rank holds the whole parameter
        return local.reshape(w.slot.shape).cpu().clone()
    full = torch.zeros(w.slot.numel, dtype=torch.float32, device=owner.device)
    full[w.in_param] = local.to(owner.device)
    comm.all_reduce(full, group=owner.group)
    return full.view(w.slot.shape).cpu()


def set_full(
    owner: ZeroStage012, param: torch.nn.Parameter, value: torch.Tensor, kind: str, key: str | None = None
) -> None:
    """Store the whole `value` of `param` (identical on every rank): each rank writes its overlap."""
    w = _where(owner, param)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != w.slot.shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"'{w.slot.name}' has shape {w.slot.shape}; got a value of shape {got}")
    with torch.no_grad():  # the buffers written below back leaf parameters (the model's and the optimizer's)
        _store(owner, w, value.detach().reshape(-1), kind, key)


def _store(owner: ZeroStage012, w: _Where, flat: torch.Tensor, kind: str, key: str | None) -> None:
    gi = w.group
    if kind == "state":
        for where, state in _state_runs(owner, w, key):
            state.copy_(flat[w.in_param][where])
    elif kind == "grad":
        if owner.stage == 2:
            _grad_run(owner, w).copy_(flat[w.in_param])
        else:
            # stages 0/1: the whole slot, so p.grad (a view at stages 0/1) reads the value on every rank;
            # a stage-1 step reads only this rank's piece of it
            owner.grad_full[gi][w.slot.offset : w.slot.end].copy_(flat)
    elif kind == "fp32":
        if owner.master[gi] is not owner.flat[gi]:
            owner.master[gi][w.shard_lo : w.shard_lo + w.numel].copy_(flat[w.in_param])
        # the model-dtype buffer (which the parameter is a view of; in fp32 the master itself) holds the
        # whole value on every rank after a step; write all of it so the forward uses the new value now
        owner.flat[gi][w.slot.offset : w.slot.end].copy_(flat)
    else:
        raise ValueError(f"unknown kind {kind!r}")
