"""Timers that synchronize the accelerator so they measure device work, and a throughput meter."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ds_core.accelerator import get_accelerator


class _Timer:
    def __init__(self, name: str) -> None:
        self.name = name
        self.elapsed_s = 0.0
        self.count = 0
        self._start: float | None = None

    def start(self) -> None:
        if self._start is not None:
            raise RuntimeError(f"timer '{self.name}' started twice")
        get_accelerator().synchronize()
        self._start = time.perf_counter()

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError(f"timer '{self.name}' stopped before it was started")
        get_accelerator().synchronize()
        took = time.perf_counter() - self._start
        self._start = None
        self.elapsed_s += took
        self.count += 1
        return took

    def reset(self) -> None:
        self.elapsed_s, self.count, self._start = 0.0, 0, None

    def mean_ms(self) -> float:
        return 1000.0 * self.elapsed_s / self.count if self.count else 0.0


class SynchronizedWallClockTimer:
    """Named timers: ``timers("forward").start()`` ... ``.stop()``; `log()` summarizes and resets."""

    def __init__(self) -> None:
        self._timers: dict[str, _Timer] = {}

    def __call__(self, name: str) -> _Timer:
        if name not in self._timers:
            self._timers[name] = _Timer(name)
        return self._timers[name]

    def names(self) -> list[str]:
        return list(self._timers)

    def summary(self, names: list[str] | None = None, reset: bool = True) -> dict[str, float]:
        """Mean milliseconds per call for each timer."""
        out = {}
        for name in names or list(self._timers):
            if name in self._timers:
                out[name] = self._timers[name].mean_ms()
                if reset:
                    self._timers[name].reset()
        return out

    def format(self, names: list[str] | None = None, reset: bool = True) -> str:
        return " | ".join(f"{k}: {v:.2f} ms" for k, v in self.summary(names, reset).items())


@dataclass
class ThroughputMeter:
    """Samples/tokens per second over a window of steps (the first `warmup_steps` are skipped)."""

    warmup_steps: int = 1
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    _start: float | None = field(default=None, repr=False)

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, samples: int = 0, tokens: int = 0) -> None:
        if self._start is None:
            raise RuntimeError("ThroughputMeter.stop() called before start()")
        took = time.perf_counter() - self._start
        self._start = None
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.seconds += took
            self.samples += samples
            self.tokens += tokens

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0
