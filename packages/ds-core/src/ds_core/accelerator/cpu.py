"""CPU as an accelerator: streams are no-ops, events time with the host clock, memory is the process's."""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from ds_core.accelerator.base import Accelerator


class _HostStream:
    """Stand-in for a device stream: CPU work is already ordered, so waiting is a no-op."""

    def synchronize(self) -> None:
        return None

    def wait_stream(self, other: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _HostEvent:
        event = event or _HostEvent(enable_timing=True)
        event.record()
        return event


class _HostEvent:
    """Event whose elapsed time comes from the host clock (CPU work is synchronous)."""

    def __init__(self, enable_timing: bool = False, **_: Any) -> None:
        self.enable_timing = enable_timing
        self._time: float | None = None

    def record(self, stream: Any = None) -> None:
        self._time = time.perf_counter()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def wait(self, stream: Any = None) -> None:
        return None

    def elapsed_time(self, end: _HostEvent) -> float:
        """Milliseconds between this event and `end`, as torch.cuda.Event reports."""
        if self._time is None or end._time is None:
            raise RuntimeError("elapsed_time() needs both events recorded")
        return (end._time - self._time) * 1000.0


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_peak_rss_bytes() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


def host_total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class CPUAccelerator(Accelerator):
    name = "cpu"

    def __init__(self) -> None:
        self._peak_baseline = 0

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, index: int) -> None:
        return None

    def device_name(self, index: int | None = None) -> str:
        # torch accepts "cpu:0" but prints "cpu"; keep plain "cpu" so device comparisons match.
        return "cpu"

    def synchronize(self, index: int | None = None) -> None:
        return None

    def Stream(self, **kwargs: Any) -> _HostStream:  # noqa: N802
        return _HostStream()

    def Event(self, enable_timing: bool = False, **kwargs: Any) -> _HostEvent:  # noqa: N802
        return _HostEvent(enable_timing=enable_timing)

    def current_stream(self) -> _HostStream:
        return _HostStream()

    def default_stream(self) -> _HostStream:
        return _HostStream()

    def memory_allocated(self, index: int | None = None) -> int:
        return host_rss_bytes()

    def max_memory_allocated(self, index: int | None = None) -> int:
        return max(host_peak_rss_bytes(), host_rss_bytes())

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        # The kernel's peak RSS cannot be reset; callers compare against a baseline instead.
        return None

    def total_memory(self, index: int | None = None) -> int:
        return host_total_memory()

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        return True

    def communication_backend_name(self) -> str:
        return "gloo"

    def describe(self) -> str:
        return f"cpu ({os.cpu_count()} cores, torch threads={torch.get_num_threads()})"
