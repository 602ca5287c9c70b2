"""Peak RSS per phase of a training step (used by bench_zero_worker.py --phases; Linux only).

Each phase resets the kernel's high-water mark on entry (/proc/self/clear_refs "5") and reads it on
exit, so a phase's peak is the largest RSS seen while it ran; nested phases report to their parent.
"""
from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

_KIB = re.compile(r"(VmHWM|VmRSS):\s+(\d+) kB")


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v) * 1024 for k, v in _KIB.findall(f.read())}


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PhaseRSS:
    """phase name -> {peak, rss_in, rss_out} in bytes (the max over every time the phase ran), and the
    mean wall time per call (`seconds` / `calls`; reading /proc costs ~0.1 ms per phase)."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, int]] = {}
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[Any]] = []  # [name, rss_in, peak so far, start time]

    def enter(self, name: str) -> None:
        s = _status()
        if self._stack:
            self._stack[-1][2] = max(self._stack[-1][2], s["VmHWM"])
        _reset_hwm()
        self._stack.append([name, s["VmRSS"], s["VmRSS"], time.perf_counter()])

    def exit(self) -> None:
        end = time.perf_counter()
        s = _status()
        name, rss_in, peak, start = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + end - start
        self.calls[name] = self.calls.get(name, 0) + 1
        peak = max(peak, s["VmHWM"])
        if self._stack:
            self._stack[-1][2] = max(self._stack[-1][2], peak)
        old = self.stats.get(name)
        new = {"peak": peak, "rss_in": rss_in, "rss_out": s["VmRSS"]}
        self.stats[name] = new if old is None else {k: max(old[k], new[k]) for k in new}

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        """Replace obj.attr (a callable) by a version that runs as phase `name`."""
        fn: Callable = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            self.enter(name)
            try:
                return fn(*a, **k)
            finally:
                self.exit()

        setattr(obj, attr, timed)

    def mark(self, name: str) -> None:
        """A point (not a span): the RSS now and the high-water mark since the last reset."""
        s = _status()
        self.stats[name] = {"peak": s["VmHWM"], "rss_in": s["VmRSS"], "rss_out": s["VmRSS"]}

    def report(self) -> dict[str, dict[str, float]]:
        out = {k: {f: round(v / 2**20, 1) for f, v in st.items()} for k, st in self.stats.items()}
        for k, secs in self.seconds.items():
            out[k]["ms_per_call"] = round(1e3 * secs / self.calls[k], 1)
        return out
