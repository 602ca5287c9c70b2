"""ZeRO-3 checkpoint shards: the same reshardable format as stages 1-2 (see `zero/partition.py`).

A stage-3 layout is `build_layout(..., bucket_size=1)`: one bucket per parameter, so rank r's shard is
its padded piece of every parameter in order. Saved tensors are "g{i}.fp32" (master weights) and one
per optimizer state key; loading regathers whole tensors through the `ShardReader` and cuts this
rank's pieces, so a checkpoint moves between world sizes and between stages 0-3. The optimizer's
parameters are chunks of the master shard (`stage3.py`): their state is assembled into one shard-sized
tensor per key on save and cut into the chunks on load, so the files keep one flat tensor per group.
"""
from __future__ import annotations

from typing import Any

import torch

from ds_train.zero.partition import GroupLayout
from ds_train.zero.shard_checkpoint import (
    check_groups_match,
    chunk_state_tensors,
    group_meta,
    restore_chunk_states,
    restore_hyperparams,
    shard_from_full,
)
from ds_train.zero.strategy import ShardReader

__all__ = ["Stage3StateMixin"]


class Stage3StateMixin:
    """Checkpoint methods of `ZeroStage3` (uses its _layouts, _ranges, _opt_params, master, optimizer,
    nvme_optimizer, tier)."""

    _layouts: list[GroupLayout]

    def layouts(self) -> list[GroupLayout]:
        return self._layouts

    def shard_index(self) -> int | None:
        return self.rank

    def _optimizer_tensors(self, gi: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if self.nvme_optimizer is not None:
            tensors = {k: self.nvme_optimizer.read_full(gi, k) for k in ("exp_avg", "exp_avg_sq")}
            return tensors, {"step": self.nvme_optimizer.steps[gi]}
        return chunk_state_tensors(self.optimizer, self._opt_params[gi], self._ranges[gi],
                                   self._layouts[gi].shard_numel)

    def _state_views(self, gi: int, key: str, lo: int, hi: int) -> list[tuple[torch.Tensor, int]]:
        """Views of optimizer state `key` covering [lo, hi) of group `gi`'s shard, one per chunk it
        overlaps, each with its offset from `lo`."""
        out = []
        for p, (a, b) in zip(self._opt_params[gi], self._ranges[gi]):
            s, e = max(a, lo), min(b, hi)
            if s >= e:
                continue
            state = self.optimizer.state.get(p, {})
            if key not in state:
                raise KeyError(f"optimizer state has no '{key}' (yet: it appears after the first step); "
                               f"keys: {sorted(state)}")
            out.append((state[key].reshape(-1)[s - a : e - a], s - lo))
        return out

    def optimizer_state_range(self, gi: int, key: str, lo: int, n: int) -> torch.Tensor:
        """Elements [lo, lo + n) of optimizer state `key` of group `gi`'s shard, in fp32 (device state)."""
        views = self._state_views(gi, key, lo, lo + n)
        return torch.cat([v.float() for v, _ in views]) if views else torch.zeros(0)

    def set_optimizer_state_range(self, gi: int, key: str, lo: int, values: torch.Tensor) -> None:
        """Overwrite elements [lo, lo + len(values)) of optimizer state `key` of group `gi` (device state)."""
        for view, at in self._state_views(gi, key, lo, lo + values.numel()):
            view.copy_(values[at : at + view.numel()])

    def shard_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for gi in range(len(self._layouts)):
            tensors[f"g{gi}.fp32"] = self.master_shard(gi).cpu().clone()
            state, scalars = self._optimizer_tensors(gi)
            for key, t in state.items():
                tensors[f"g{gi}.{key}"] = t
            metas.append(group_meta(self.optimizer.param_groups[gi], scalars, list(state)))
        return tensors, metas

    def _shard_from_full(self, gi: int, full: dict[str, torch.Tensor], what: str) -> torch.Tensor:
        return shard_from_full(self._layouts[gi], self.rank, full, what)

    def load_shard_state(self, reader: ShardReader, load_optimizer_states: bool) -> None:
        check_groups_match(reader, self._layouts)  # everything is validated before anything changes
        for gi in range(len(self._layouts)):
            master = self._shard_from_full(gi, reader.full_tensors(gi, "fp32"), "fp32")
            self._set_master(gi, master)
            if not load_optimizer_states:
                continue
            meta = reader.group_meta(gi)
            restore_hyperparams(self.optimizer.param_groups[gi], meta)
            states = {key: self._shard_from_full(gi, reader.full_tensors(gi, key), key)
                      for key in meta.get("state_keys", [])}
            scalars = meta.get("scalar_state", {})
            if self.nvme_optimizer is not None:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key not in states:
                        raise ValueError(f"checkpoint group {gi} has no '{key}' (NVMe offload streams Adam)")
                    self.nvme_optimizer.write_full(gi, key, states[key])
                self.nvme_optimizer.steps[gi] = int(scalars.get("step", 0))
                continue
            restore_chunk_states(self.optimizer, self._opt_params[gi], self._ranges[gi], states, scalars)
        self._refresh_persistent()
        self.reducer.clear()

    def _set_master(self, gi: int, master: torch.Tensor) -> None:
        """New fp32 master shard for group `gi`; the model-dtype shard follows."""
        if self.nvme_optimizer is not None:
            self.nvme_optimizer.write_full(gi, "fp32", master)
        else:
            self.master[gi].copy_(master)
        if self.tier.flat(gi) is not self.master[gi] or self.nvme_optimizer is not None:
            self.tier.write_group(gi, 0, master.to(self.dtype))
        for rec in self.records:
            if rec.group == gi:
                self.gatherer.release(rec, force=True)

