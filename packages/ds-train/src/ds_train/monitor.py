"""Scalar monitors: ``csv_monitor`` (built in) and ``tensorboard`` (needs the tensorboard package)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

__all__ = ["Monitors"]


class _CSVMonitor:
    """One CSV file per scalar name, DeepSpeed's layout: <output_path>/<job_name>/<name>.csv (step,value)."""

    def __init__(self, output_path: str, job_name: str) -> None:
        self.dir = Path(output_path or ".") / job_name
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, events: list[tuple[str, float, int]]) -> None:
        for name, value, step in events:
            path = self.dir / (name.replace("/", "_") + ".csv")
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", name])
                w.writerow([step, value])


class _TensorBoardMonitor:
    def __init__(self, output_path: str, job_name: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "config 'tensorboard.enabled' needs the tensorboard package: pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(log_dir=os.path.join(output_path or "runs", job_name))

    def write(self, events: list[tuple[str, float, int]]) -> None:
        for name, value, step in events:
            self.writer.add_scalar(name, value, step)
        self.writer.flush()


class Monitors:
    """Writes (name, value, step) events to every enabled monitor, on rank 0 only."""

    def __init__(self, config: Any, rank: int) -> None:
        self.sinks: list[Any] = []
        if rank != 0:
            return
        if config.csv_monitor.enabled:
            self.sinks.append(_CSVMonitor(config.csv_monitor.output_path, config.csv_monitor.job_name))
        if config.tensorboard.enabled:
            self.sinks.append(_TensorBoardMonitor(config.tensorboard.output_path, config.tensorboard.job_name))

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def write(self, events: list[tuple[str, float, int]]) -> None:
        for sink in self.sinks:
            sink.write(events)
