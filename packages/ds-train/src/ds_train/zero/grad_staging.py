"""Stage 2's gradient staging buckets: during backward each gradient is copied into its bucket's
staging buffer, which is reduced as soon as the bucket is full and then returned to a small pool (which
also lends the scratch that a reduce-scatter by sends receives into, stages 1 and 2).

Buffers are reused without being zeroed (every arriving gradient overwrites its slot); before a bucket
is sent, `zero_unwritten` clears only the slots no gradient reached in this backward (unused
parameters) and the bucket's padding, instead of zeroing the whole bucket every step.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ds_train.zero.partition import GroupLayout

__all__ = ["StagingBuffers"]


class StagingBuffers:
    """Bucket-sized staging buffers keyed by (group, bucket), drawn from a pool of free ones by size."""

    def __init__(self, layouts: list[GroupLayout], dtype: torch.dtype, device: torch.device) -> None:
        self._layouts, self._dtype, self._device = layouts, dtype, device
        self._live: dict[tuple[int, int], torch.Tensor] = {}
        self._free: dict[int, list[torch.Tensor]] = {}

    def get(self, gi: int, bi: int) -> torch.Tensor:
        buf = self._live.get((gi, bi))
        if buf is None:
            n = self._layouts[gi].buckets[bi].numel
            free = self._free.get(n)
            buf = free.pop() if free else torch.empty(n, dtype=self._dtype, device=self._device)
            self._live[(gi, bi)] = buf
        return buf

    def take(self, numel: int) -> torch.Tensor:
        """A free buffer of `numel` elements for other per-bucket scratch (e.g. received pieces)."""
        free = self._free.get(numel)
        return free.pop() if free else torch.empty(numel, dtype=self._dtype, device=self._device)

    def put(self, buf: torch.Tensor) -> None:
        """Give back a buffer from `take`."""
        self._free.setdefault(buf.numel(), []).append(buf)

    def release(self, gi: int, bi: int) -> None:
        buf = self._live.pop((gi, bi), None)
        if buf is not None:
            self.put(buf)

    def release_all(self) -> None:
        for key in list(self._live):
            self.release(*key)

    def clear_live(self) -> None:
        """Forget the buffers of an abandoned backward (they are not reused: something may still view them)."""
        self._live = {}

    def zero_unwritten(self, gi: int, bi: int, unwritten: Iterable[int]) -> torch.Tensor:
        """The bucket's buffer with the slots `unwritten` (parameter indices no gradient reached in
        this backward) and the padding set to zero."""
        buf = self.get(gi, bi)
        layout = self._layouts[gi]
        b = layout.buckets[bi]
        for si in unwritten:
            slot = layout.slots[si]
            buf[slot.offset - b.start : slot.end - b.start].zero_()
        tail = layout.slots[b.last_param - 1].end if b.last_param > b.first_param else b.start
        buf[tail - b.start :].zero_()
        return buf
