"""ZeRO-3 parameter shards on NVMe (offload_param.device = "nvme").

Each param group's flat model-dtype shard is one file; a parameter's piece is read into an aligned
buffer right before its all-gather (which the prefetcher starts ahead of use), and the optimizer
writes updated pieces back after the step. Nothing of the shard stays resident beyond the buffer.
"""
from __future__ import annotations

import torch

from ds_train.offload.swap_folder import SwapFolder
from ds_train.zero.stage3_params import Stage3Param

__all__ = ["NvmeParamTier"]


class NvmeParamTier:
    """A `ShardTier` whose flat shards live in `params_g{i}.bin` files of `folder`."""

    def __init__(self, folder: SwapFolder, sizes: list[int], dtype: torch.dtype, buffer_numel: int,
                 largest_shard: int) -> None:
        from ds_kernels.aio import aligned_empty

        if buffer_numel < largest_shard:
            raise ValueError(
                f"offload_param.buffer_size ({buffer_numel} elements) is smaller than the largest parameter "
                f"shard ({largest_shard} elements); raise offload_param.buffer_size"
            )
        self.folder, self.dtype, self.sizes = folder, dtype, sizes
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.buffer = aligned_empty(max(1, largest_shard), dtype)
        zeros = aligned_empty(max(1, min(max(sizes, default=1), 1 << 20)), dtype).zero_()
        for gi, n in enumerate(sizes):  # create every file at its full size
            for start in range(0, n, zeros.numel()):
                count = min(zeros.numel(), n - start)
                folder.wait(folder.write(zeros[:count], self._name(gi), start * self.itemsize))

    @staticmethod
    def _name(group: int) -> str:
        return f"params_g{group}.bin"

    def read(self, rec: Stage3Param) -> torch.Tensor:
        out = self.buffer[: rec.shard_numel]
        self.folder.wait(self.folder.read(out, self._name(rec.group), rec.shard_offset * self.itemsize))
        return out

    def write_group(self, group: int, offset: int, values: torch.Tensor) -> None:
        values = values.to(self.dtype).contiguous()
        self.folder.wait(self.folder.write(values, self._name(group), offset * self.itemsize))

    def flat(self, group: int) -> torch.Tensor | None:
        return None

    def read_group(self, group: int) -> torch.Tensor:
        out = torch.empty(self.sizes[group], dtype=self.dtype)
        self.folder.wait(self.folder.read(out, self._name(group), 0))
        return out
