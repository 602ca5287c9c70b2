"""Small utilities: timers, throughput, memory reports."""
from ds_core.utils.memory import MemoryReport, memory_report, tensor_bytes
from ds_core.utils.timers import SynchronizedWallClockTimer, ThroughputMeter

__all__ = ["MemoryReport", "memory_report", "tensor_bytes", "SynchronizedWallClockTimer", "ThroughputMeter"]
