"""The comms logger: per-collective count, bytes and time, off by default, on by config.

Later components check communication volumes against theory with `totals()`.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class _OpStats:
    count: int = 0
    bytes: int = 0
    ms: float = 0.0
    sizes: dict[int, int] = field(default_factory=lambda: defaultdict(int))


class CommsLogger:
    """Records each collective issued through ds_core.comm while enabled."""

    def __init__(self) -> None:
        self.enabled = False
        self.verbose = False
        self.prof_all = True
        self.prof_ops: set[str] = set()
        self._stats: dict[str, _OpStats] = defaultdict(_OpStats)

    def configure(
        self,
        enabled: bool = True,
        verbose: bool = False,
        prof_all: bool = True,
        prof_ops: list[str] | None = None,
        debug: bool = False,
    ) -> None:
        self.enabled = enabled
        self.verbose = verbose or debug
        self.prof_all = prof_all
        self.prof_ops = set(prof_ops or [])

    def wants(self, op: str) -> bool:
        return self.enabled and (self.prof_all or op in self.prof_ops)

    def record(self, op: str, nbytes: int, seconds: float) -> None:
        st = self._stats[op]
        st.count += 1
        st.bytes += nbytes
        st.ms += seconds * 1000.0
        st.sizes[nbytes] += 1
        if self.verbose:
            from ds_core.logging import log_dist

            log_dist(f"comm op: {op} | {nbytes} bytes | {seconds * 1000:.3f} ms", ranks=None)

    def reset(self) -> None:
        self._stats.clear()

    def totals(self) -> dict[str, dict[str, Any]]:
        """{op: {"count", "bytes", "ms"}} for every op recorded since the last reset."""
        return {op: {"count": s.count, "bytes": s.bytes, "ms": s.ms} for op, s in sorted(self._stats.items())}

    def summary(self) -> str:
        """A table: op, count, total MB, total ms, mean algorithmic bandwidth."""
        rows = [f"{'op':<24}{'count':>8}{'MB':>12}{'ms':>12}{'GB/s':>10}"]
        for op, s in sorted(self._stats.items()):
            gbps = (s.bytes / 1e9) / (s.ms / 1e3) if s.ms > 0 else 0.0
            rows.append(f"{op:<24}{s.count:>8}{s.bytes / 1e6:>12.3f}{s.ms:>12.3f}{gbps:>10.2f}")
        return "\n".join(rows)

    def log_summary(self) -> None:
        from ds_core.logging import log_dist

        log_dist("comms summary\n" + self.summary())


comms_logger = CommsLogger()


def nbytes_of(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes_of(o) for o in obj)
    return 0


class TimedWork:
    """Wraps an async handle so the logger sees the time until `wait()` returns."""

    def __init__(self, work: Any, op: str, nbytes: int, start: float) -> None:
        self._work, self._op, self._nbytes, self._start = work, op, nbytes, start
        self._done = False

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        out = self._work.wait(*args, **kwargs) if self._work is not None else True
        if not self._done:
            self._done = True
            comms_logger.record(self._op, self._nbytes, time.perf_counter() - self._start)
        return out

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)
