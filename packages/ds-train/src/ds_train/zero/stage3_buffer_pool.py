"""Reusable flat buffers for ZeRO-3's gathers: the same sizes every step, allocated once.

Why: each step gathers every partitioned parameter twice and frees it after use. With glibc's
allocator those mid-sized buffers (a few MiB: below the mmap threshold once a larger block has been
freed) land in the heap between activations and are freed in another order than allocated, so the
heap fragments and keeps growing: the process's resident set ended up far above what it held. The
gather sizes repeat exactly (same parameters, same prefetch batches in the recorded order), so a free
list per exact size hands the same blocks back and the allocator sees no churn after the first step.

Safety: a buffer goes back to the free list only when nothing but the returned tensor refers to its
storage (`torch._C._storage_Use_Count`): a view someone still holds (autograd saved a parameter
outside the saved-tensor hooks, a caller kept `param.data`) keeps the buffer out of the pool, and it
is freed normally when that view dies. So a pooled buffer is never handed out while readable elsewhere.
The free bytes are capped at twice the largest amount ever checked out at once (forward and backward
gather different batches, so their sizes differ: both sets fit), so the pool stays within a small
multiple of what the gathers need simultaneously.
"""
from __future__ import annotations

import torch

__all__ = ["BufferPool", "storage_refs"]


def storage_refs(t: torch.Tensor) -> int:
    """Tensors (and storage objects) sharing `t`'s storage, `t` itself included."""
    storage = t.untyped_storage()
    # the temporary `storage` object holds one reference of its own
    return torch._C._storage_Use_Count(storage._cdata) - 1


class BufferPool:
    """Free lists of 1-D tensors keyed by (numel, dtype, device)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # off: every buffer goes back to the allocator (NVMe tiers: least resident memory)
        self._free: dict[tuple[int, torch.dtype, torch.device], list[torch.Tensor]] = {}
        self.free_bytes = 0
        self.out_bytes = 0  # checked out and not yet given back (or dropped)
        self.peak_out_bytes = 0
        self.allocations = 0  # fresh tensors made: stays flat once the step's sizes are all pooled
        self.reuses = 0
        self.refused = 0  # buffers given back while still shared: not pooled
        self._taken: set[int] = set()  # data_ptr of every buffer checked out (others are never pooled)

    def take(self, numel: int, dtype: torch.dtype, device: torch.device, *, round_up: bool = False) -> torch.Tensor:
        """A 1-D tensor of `numel` elements with undefined contents (with `round_up`, of `size_class(numel)`
        elements: the caller slices it; sizes that vary from call to call then share a few free lists)."""
        device = torch.device(device)
        if round_up and self.enabled:  # size classes only pay off when blocks come back
            numel = size_class(numel)
        free = self._free.get((numel, dtype, device))
        if free:
            t = free.pop()
            self.free_bytes -= _nbytes(t)
            self.reuses += 1
        else:
            t = torch.empty(numel, dtype=dtype, device=device)
            self.allocations += 1
        self._taken.add(t.data_ptr())
        self.out_bytes += _nbytes(t)
        self.peak_out_bytes = max(self.peak_out_bytes, self.out_bytes)
        return t

    def give(self, t: torch.Tensor) -> bool:
        """Return a tensor from `take`; the caller drops its references. True when it was pooled."""
        if t.data_ptr() not in self._taken or t.dim() != 1 or t.storage_offset() != 0:
            return False  # not one of ours (e.g. zero.Init installed its own whole tensor)
        self._taken.discard(t.data_ptr())
        n = _nbytes(t)
        self.out_bytes -= n
        if storage_refs(t) > 1:
            self.refused += 1  # a view is still alive: reusing the storage would change what it reads
            return False
        if not self.enabled or self.free_bytes + n > 2 * self.peak_out_bytes:
            return False  # twice what the gathers ever held at once: let the allocator have it
        self._free.setdefault((t.numel(), t.dtype, t.device), []).append(t)
        self.free_bytes += n
        return True

    def clear(self) -> None:
        self._free.clear()
        self.free_bytes = 0


def size_class(n: int) -> int:
    """`n` rounded up to one of 8 steps per power of two (at most 12.5% larger)."""
    if n <= 8:
        return max(n, 1)
    step = 1 << max((n - 1).bit_length() - 4, 0)
    return -(-n // step) * step


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
