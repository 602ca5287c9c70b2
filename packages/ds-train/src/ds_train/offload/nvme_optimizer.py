"""Optimizer state on NVMe (offload_optimizer.device = "nvme"): Adam streamed through aligned buffers.

Per param group, the fp32 master shard and the two Adam moments are three files. `step` walks the
shard in chunks of `chunk_numel` elements with `buffer_count` buffer sets in rotation: the reads of
chunk i+1 are in flight while the CPU Adam kernel updates chunk i, and chunk i's writes go out while
chunk i+1 computes. Only the buffers are resident (3 x 4 bytes x chunk x buffer_count).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ds_train.offload.swap_folder import SwapFolder

__all__ = ["NvmeOptimizerSwapper", "STATE_KEYS"]

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


class _BufferSet:
    def __init__(self, numel: int) -> None:
        from ds_kernels.aio import aligned_empty

        self.tensors = {k: aligned_empty(numel, torch.float32) for k in STATE_KEYS}
        self.reads: list[Any] = []
        self.writes: list[Any] = []


class NvmeOptimizerSwapper:
    """fp32 master weights and Adam moments of each param group in files of `folder`."""

    def __init__(self, folder: SwapFolder, sizes: list[int], chunk_numel: int, buffer_count: int) -> None:
        if buffer_count < 2:
            raise ValueError(f"offload_optimizer.buffer_count must be >= 2 for NVMe (got {buffer_count})")
        self.folder, self.sizes = folder, sizes
        largest = max(sizes, default=1)
        self.chunk = max(1, min(chunk_numel, largest))
        self.sets = [_BufferSet(self.chunk) for _ in range(buffer_count)]
        self.steps = [0 for _ in sizes]

    @staticmethod
    def _name(group: int, key: str) -> str:
        return f"optim_g{group}_{key}.bin"

    # -- whole-shard access (initialization, checkpoints) ---------------------------------------------
    def write_full(self, group: int, key: str, values: torch.Tensor) -> None:
        """Store a whole shard (fp32), chunk by chunk through a buffer."""
        buf = self.sets[0].tensors[key]
        values = values.reshape(-1)
        for start in range(0, self.sizes[group], self.chunk):
            n = min(self.chunk, self.sizes[group] - start)
            buf[:n].copy_(values[start : start + n])
            self.folder.wait(self.folder.write(buf[:n], self._name(group, key), start * 4))

    def write_range(self, group: int, key: str, offset: int, values: torch.Tensor) -> None:
        """Store fp32 `values` at element `offset` of a shard file (GatheredParameters, safe_set_*)."""
        values = values.reshape(-1).float().contiguous()
        self.folder.wait(self.folder.write(values, self._name(group, key), offset * 4))

    def read_range(self, group: int, key: str, offset: int, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        if numel:
            self.folder.wait(self.folder.read(out, self._name(group, key), offset * 4))
        return out

    def read_full(self, group: int, key: str) -> torch.Tensor:
        out = torch.empty(self.sizes[group], dtype=torch.float32)
        if out.numel():
            self.folder.wait(self.folder.read(out, self._name(group, key), 0))
        return out

    def init_group(self, group: int, master: torch.Tensor | None) -> None:
        """Zero moments; the master shard too unless given (the caller then writes it with write_range)."""
        if master is not None:
            self.write_full(group, "fp32", master)
        else:
            self._fill_zeros(group, "fp32")
        for key in ("exp_avg", "exp_avg_sq"):
            self._fill_zeros(group, key)
        self.steps[group] = 0

    def _fill_zeros(self, group: int, key: str) -> None:
        buf = self.sets[0].tensors[key].zero_()
        for start in range(0, self.sizes[group], self.chunk):
            n = min(self.chunk, self.sizes[group] - start)
            self.folder.wait(self.folder.write(buf[:n], self._name(group, key), start * 4))

    # -- the update -----------------------------------------------------------------------------------
    def step(self, group: int, grad: torch.Tensor, scale: float, hyper: dict[str, Any], adamw: bool,
             write_lowp: Callable[[int, torch.Tensor], None]) -> None:
        """One Adam(W) step of group `group` with gradient `grad` x `scale` (its whole shard, any float dtype).

        `write_lowp(offset, fp32_chunk)` receives each updated master chunk (to refresh the model-dtype shard).
        """
        from ds_kernels.optim import cpu_adam_step

        size = self.sizes[group]
        if size == 0:
            return
        self.steps[group] += 1
        step = self.steps[group]
        starts = list(range(0, size, self.chunk))
        self._read_chunk(group, starts[0], self.sets[0])
        for i, start in enumerate(starts):
            bufs = self.sets[i % len(self.sets)]
            n = min(self.chunk, size - start)
            if i + 1 < len(starts):  # start the next chunk's reads before computing this one
                self._read_chunk(group, starts[i + 1], self.sets[(i + 1) % len(self.sets)])
            for req in bufs.reads:
                self.folder.wait(req)
            bufs.reads = []
            p, m, v = (bufs.tensors[k][:n] for k in STATE_KEYS)
            g = grad[start : start + n].float()  # one chunk in fp32 at a time, never the whole shard
            if scale != 1.0:
                g = g.mul_(scale) if g.data_ptr() != grad.data_ptr() or grad.dtype != torch.float32 \
                    else g * scale
            cpu_adam_step(p, g, m, v, step=step, lr=hyper["lr"], beta1=hyper["betas"][0],
                          beta2=hyper["betas"][1], eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                          adamw_mode=adamw, bias_correction=hyper.get("bias_correction", True))
            write_lowp(start, p)
            bufs.writes = [self.folder.write(bufs.tensors[k][:n], self._name(group, k), start * 4)
                           for k in STATE_KEYS]
        for s in self.sets:
            for req in s.writes:
                self.folder.wait(req)
            s.writes = []

    def _read_chunk(self, group: int, start: int, bufs: _BufferSet) -> None:
        for req in bufs.writes:  # this buffer set's previous chunk must be on disk before it is reused
            self.folder.wait(req)
        bufs.writes = []
        n = min(self.chunk, self.sizes[group] - start)
        bufs.reads = [self.folder.read(bufs.tensors[k][:n], self._name(group, k), start * 4) for k in STATE_KEYS]

    def resident_bytes(self) -> int:
        return sum(t.numel() * 4 for s in self.sets for t in s.tensors.values())

    def close(self) -> None:
        for s in self.sets:
            for req in s.reads + s.writes:
                try:
                    self.folder.wait(req)
                except RuntimeError:
                    pass
        self.sets = []


def adam_hyper(optimizer: torch.optim.Optimizer, group: int) -> tuple[dict[str, Any], bool]:
    """(hyperparameters, adamw_mode) of `optimizer`'s group for the streamed Adam; other optimizers are refused."""
    g = optimizer.param_groups[group]
    name = type(optimizer).__name__
    if name == "DSCPUAdam":
        return g, bool(g.get("adamw_mode", True))
    if isinstance(optimizer, torch.optim.AdamW):
        adamw = True
    elif isinstance(optimizer, torch.optim.Adam):
        adamw = False
    else:
        raise ValueError(f"offload_optimizer.device='nvme' streams Adam/AdamW only; the optimizer is {name}")
    if g.get("amsgrad", False):
        raise ValueError("offload_optimizer.device='nvme' does not support amsgrad=true")
    return g, adamw

