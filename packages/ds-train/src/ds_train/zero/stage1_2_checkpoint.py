"""ZeRO stages 0-2 checkpoint shards (the reshardable format of `zero/partition.py`).

Saved per param group: "g{i}.fp32" (this rank's fp32 master shard) and one shard-sized tensor per
optimizer state key, assembled from the optimizer's chunk parameters; loading regathers whole tensors
through the `ShardReader` and cuts this rank's pieces, so a checkpoint moves between world sizes and
stages. Kept apart from `stage1_2.py`, which moves gradients and parameters.
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

__all__ = ["Stage012CheckpointMixin"]


class Stage012CheckpointMixin:
    """Checkpoint methods of `ZeroStage012` (uses its _layouts, part, rank, parts, _ranges, _opt_params,
    optimizer, _master_shard, _write_master_shard, _refresh_params, _clear_grads)."""

    _layouts: list[GroupLayout]

    def layouts(self) -> list[GroupLayout]:
        return self._layouts

    def shard_index(self) -> int | None:
        return self.part if self.rank < self.parts else None

    def shard_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for gi in range(len(self._layouts)):
            tensors[f"g{gi}.fp32"] = self._master_shard(gi).detach().float().cpu().clone()
            state, scalars = chunk_state_tensors(self.optimizer, self._opt_params[gi],
                                                 [(lo, hi) for lo, hi, _ in self._ranges[gi]],
                                                 self._layouts[gi].shard_numel)
            for key, t in state.items():
                tensors[f"g{gi}.{key}"] = t.clone()
            metas.append(group_meta(self.optimizer.param_groups[gi], scalars, list(state)))
        return tensors, metas

    def _shard_from_full(self, gi: int, full: dict[str, torch.Tensor], what: str) -> torch.Tensor:
        return shard_from_full(self._layouts[gi], self.part, full, what)

    def load_shard_state(self, reader: ShardReader, load_optimizer_states: bool) -> None:
        check_groups_match(reader, self._layouts)
        for gi in range(len(self._layouts)):
            self._write_master_shard(gi, self._shard_from_full(gi, reader.full_tensors(gi, "fp32"), "fp32"))
            if not load_optimizer_states:
                continue
            meta = reader.group_meta(gi)
            restore_hyperparams(self.optimizer.param_groups[gi], meta)
            states = {key: self._shard_from_full(gi, reader.full_tensors(gi, key), key)
                      for key in meta.get("state_keys", [])}
            restore_chunk_states(self.optimizer, self._opt_params[gi],
                                 [(lo, hi) for lo, hi, _ in self._ranges[gi]], states, meta.get("scalar_state", {}))
        self._refresh_params()
        self._clear_grads()
