import time

import pytest
import torch
from ds_core.utils import SynchronizedWallClockTimer, ThroughputMeter, memory_report, tensor_bytes


def test_timers_measure_and_reset():
    timers = SynchronizedWallClockTimer()
    for _ in range(2):
        timers("step").start()
        time.sleep(0.02)
        timers("step").stop()
    mean = timers.summary(["step"])["step"]
    assert 15 <= mean <= 500
    assert timers.summary(["step"])["step"] == 0.0  # reset by the first summary
    with pytest.raises(RuntimeError, match="stopped before it was started"):
        timers("other").stop()


def test_throughput_skips_warmup():
    meter = ThroughputMeter(warmup_steps=1)
    for _ in range(3):
        meter.start()
        time.sleep(0.01)
        meter.stop(samples=4, tokens=400)
    assert meter.samples == 8 and meter.tokens == 800
    assert 0 < meter.tokens_per_second < 400 / 0.009


def test_tensor_bytes_counts_shared_storage_once():
    a = torch.zeros(1000)
    assert tensor_bytes([a, a[10:], a.view(10, 100)]) == 4000
    assert tensor_bytes([a, torch.zeros(10, dtype=torch.bfloat16)]) == 4020


def test_memory_report_reads_rss():
    rep = memory_report()
    assert rep.host_rss > 10 * 1024 * 1024
    assert "host RSS" in str(rep)
