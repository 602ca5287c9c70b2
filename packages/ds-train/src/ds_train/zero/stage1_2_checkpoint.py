"""ZeRO stages 0-2 checkpoint shards (the reshardable format of `zero/partition.py`).

Saved per param group: "g{i}.fp32" (this rank's fp32 master shard) and one shard-sized tensor per
optimizer state key, assembled from the optimizer's chunk parameters; loading regathers whole tensors
through the `ShardReader` and cuts this rank's pieces, so a checkpoint moves between world sizes and
stages. Kept apart from `stage1_2.py`, which moves gradients and parameters.
"""
from __future__ import annotations

from typing import Any

import torch

from ds_train.zero.chunked_step import is_state_tensor as _is_state_tensor
from ds_train.zero.partition import GroupLayout
from ds_train.zero.shard_checkpoint import group_meta, shard_from_full
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

    def _state_tensors(self, gi: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Shard-shaped state tensors and scalar state of group `gi`'s optimizer parameters."""
        shard_numel = self._layouts[gi].shard_numel
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for p, (lo, hi, _) in zip(self._opt_params[gi], self._ranges[gi]):
            for key, value in self.optimizer.state.get(p, {}).items():
                if _is_state_tensor(key, value, p):
                    buf = tensors.setdefault(key, torch.zeros(shard_numel, dtype=torch.float32))
                    buf[lo:hi] = value.detach().reshape(-1).float().cpu()
                else:
                    scalar = value.item() if isinstance(value, torch.Tensor) else value
                    scalars.setdefault(key, scalar)
        return tensors, scalars

    def shard_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        tensors: dict[str, torch.Tensor] = {}
        metas = []
        for gi in range(len(self._layouts)):
            tensors[f"g{gi}.fp32"] = self._master_shard(gi).detach().float().cpu().clone()
            state, scalars = self._state_tensors(gi)
            for key, t in state.items():
                tensors[f"g{gi}.{key}"] = t.clone()
            metas.append(group_meta(self.optimizer.param_groups[gi], scalars, list(state)))
        return tensors, metas

    def _shard_from_full(self, gi: int, full: dict[str, torch.Tensor], what: str) -> torch.Tensor:
        return shard_from_full(self._layouts[gi], self.part, full, what)

    def load_shard_state(self, reader: ShardReader, load_optimizer_states: bool) -> None:
        if reader.group_count() != len(self._layouts):
            raise ValueError(f"checkpoint has {reader.group_count()} param groups, this engine has {len(self._layouts)}")
        for gi, layout in enumerate(self._layouts):
            names = [s.name for s in layout.slots]
            saved = reader.param_names(gi)
            if sorted(saved) != sorted(names):
                missing = sorted(set(names) - set(saved))
                extra = sorted(set(saved) - set(names))
                raise ValueError(
                    f"param group {gi} does not match the checkpoint: missing from checkpoint {missing[:5]}, "
                    f"not in model {extra[:5]}"
                )
            self._write_master_shard(gi, self._shard_from_full(gi, reader.full_tensors(gi, "fp32"), "fp32"))
            if not load_optimizer_states:
                continue
            meta = reader.group_meta(gi)
            group = self.optimizer.param_groups[gi]
            for k, v in meta.get("hyperparams", {}).items():
                if k in group:
                    group[k] = tuple(v) if isinstance(group[k], tuple) else v
            shards = {key: self._shard_from_full(gi, reader.full_tensors(gi, key), key)
                      for key in meta.get("state_keys", [])}
            for p, (lo, hi, _) in zip(self._opt_params[gi], self._ranges[gi]):
                state = self.optimizer.state[p]
                state.clear()
                for key, shard in shards.items():
                    state[key] = shard[lo:hi].view(p.shape).to(device=p.device, dtype=p.dtype).clone()
                for key, scalar in meta.get("scalar_state", {}).items():
                    state[key] = _restore_scalar(self.optimizer, key, scalar, p)
        self._refresh_params()
        self._clear_grads()


def _restore_scalar(optimizer: torch.optim.Optimizer, key: str, value: Any, p: torch.Tensor) -> Any:
    """torch optimizers keep `step` as a float tensor; ds-kernels' keep an int."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad)) and key == "step":
        return torch.tensor(float(value), dtype=torch.float32)
    return value

