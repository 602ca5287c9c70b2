"""Memory reports: host RSS and device memory, and the bytes held by a set of tensors."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ds_core.accelerator import get_accelerator, host_peak_rss_bytes, host_rss_bytes

GiB = 1024**3


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storage held by `tensors` (views of one storage count once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen and key != 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


@dataclass
class MemoryReport:
    host_rss: int
    host_peak_rss: int
    device_allocated: int
    device_peak: int
    device_name: str

    def __str__(self) -> str:
        s = f"host RSS {self.host_rss / GiB:.2f} GiB (peak {self.host_peak_rss / GiB:.2f})"
        if self.device_name != "cpu":
            s += f" | {self.device_name} {self.device_allocated / GiB:.2f} GiB (peak {self.device_peak / GiB:.2f})"
        return s


def memory_report() -> MemoryReport:
    acc = get_accelerator()
    on_device = acc.name != "cpu"
    return MemoryReport(
        host_rss=host_rss_bytes(),
        host_peak_rss=host_peak_rss_bytes(),
        device_allocated=acc.memory_allocated() if on_device else 0,
        device_peak=acc.max_memory_allocated() if on_device else 0,
        device_name=acc.name,
    )
