"""ZeRO-3 parameter shards on NVMe (offload_param.device = "nvme").

Each param group's flat model-dtype shard is one file. A parameter's piece is read into one of
`buffer_count` aligned buffers before its all-gather copies it out. The prefetcher tells the tier
which pieces come next (`read_ahead`, in the recorded module order), and their reads are submitted
at once, so the drive works on the next modules while this one computes and each later `read`
finds its piece already (or partly) in a buffer. The optimizer writes updated pieces back after the
step; a write drops read-aheads of the same range (their data would be stale). Nothing of the shard
stays resident beyond the buffers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ds_train.offload.swap_folder import SwapFolder
from ds_train.zero.stage3_params import Stage3Param

__all__ = ["NvmeParamTier"]


class NvmeParamTier:
    """A `ShardTier` whose flat shards live in `params_g{i}.bin` files of `folder`."""

    on_disk = True

    def __init__(self, folder: SwapFolder, sizes: list[int], dtype: torch.dtype, buffer_numel: int,
                 largest_shard: int, buffer_count: int = 1) -> None:
        from ds_kernels.aio import aligned_empty

        if buffer_numel < largest_shard:
            raise ValueError(
                f"offload_param.buffer_size ({buffer_numel} elements) is smaller than the largest parameter "
                f"shard ({largest_shard} elements); raise offload_param.buffer_size"
            )
        if buffer_count < 1:
            raise ValueError(f"offload_param.buffer_count must be >= 1 (got {buffer_count})")
        self.folder, self.dtype, self.sizes = folder, dtype, sizes
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        # each buffer holds one shard: sized by the largest, not by buffer_size (often far larger)
        self.free: list[torch.Tensor] = [aligned_empty(max(1, largest_shard), dtype) for _ in range(buffer_count)]
        self.ahead: OrderedDict[tuple[int, int], tuple[torch.Tensor, Any, int]] = OrderedDict()
        self.lent: torch.Tensor | None = None  # the buffer the last `read` returned, free at the next call
        self.wanted: list[Stage3Param] = []  # read-aheads waiting for a free buffer, in order of use
        zeros = aligned_empty(max(1, min(max(sizes, default=1), 1 << 20)), dtype).zero_()
        for gi, n in enumerate(sizes):  # create every file at its full size
            for start in range(0, n, zeros.numel()):
                count = min(zeros.numel(), n - start)
                folder.wait(folder.write(zeros[:count], self._name(gi), start * self.itemsize))

    @staticmethod
    def _name(group: int) -> str:
        return f"params_g{group}.bin"

    def _reclaim(self) -> None:
        if self.lent is not None:  # the caller has copied it out by now (it copies before the next call)
            self.free.append(self.lent)
            self.lent = None

    def _submit(self, buffer: torch.Tensor, rec: Stage3Param) -> Any:
        return self.folder.read(buffer[: rec.shard_numel], self._name(rec.group), rec.shard_offset * self.itemsize)

    def read_ahead(self, recs: list[Stage3Param]) -> None:
        """The pieces needed next, in order: read them into free buffers now, the rest as buffers free up."""
        self._reclaim()
        self.wanted = [r for r in recs if (r.group, r.shard_offset) not in self.ahead]
        self._fill()

    def _fill(self) -> None:
        while self.free and self.wanted:
            rec = self.wanted.pop(0)
            key = (rec.group, rec.shard_offset)
            if key not in self.ahead:
                buffer = self.free.pop()
                self.ahead[key] = (buffer, self._submit(buffer, rec), rec.shard_numel)

    def read(self, rec: Stage3Param) -> torch.Tensor:
        """This rank's piece of `rec`; valid until the next call on this tier."""
        self._reclaim()
        key = (rec.group, rec.shard_offset)
        self.wanted = [r for r in self.wanted if (r.group, r.shard_offset) != key]
        entry = self.ahead.pop(key, None)
        if entry is not None:
            buffer, request, _ = entry
        else:
            if not self.free:  # every buffer holds a read-ahead: the oldest one gives its buffer up
                _, (old, old_request, _) = self.ahead.popitem(last=False)
                self.folder.wait(old_request)
                self.free.append(old)
            buffer = self.free.pop()
            request = self._submit(buffer, rec)
        self._fill()  # keep the drive busy with the next pieces while this one is waited for and copied
        self.folder.wait(request)
        self.lent = buffer
        return buffer[: rec.shard_numel]

    def _drop_ahead(self, group: int, lo: int, hi: int) -> None:
        for key in [k for k, (_, _, n) in self.ahead.items() if k[0] == group and k[1] < hi and k[1] + n > lo]:
            buffer, request, _ = self.ahead.pop(key)
            self.folder.wait(request)  # the buffer may not be reused while the drive still writes into it
            self.free.append(buffer)

    def write_group(self, group: int, offset: int, values: torch.Tensor) -> None:
        values = values.to(self.dtype).contiguous()
        self._drop_ahead(group, offset, offset + values.numel())
        self.folder.wait(self.folder.write(values, self._name(group), offset * self.itemsize))

    def flat(self, group: int) -> torch.Tensor | None:
        return None

    def read_group(self, group: int) -> torch.Tensor:
        out = torch.empty(self.sizes[group], dtype=self.dtype)
        self.folder.wait(self.folder.read(out, self._name(group), 0))
        return out
