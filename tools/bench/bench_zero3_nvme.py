"""ZeRO-Infinity (NVMe offload of parameters and optimizer): time waiting on I/O and bandwidth vs `dd`.

One process trains a 25M-parameter MLP at stage 3 in bf16 with offload_param and offload_optimizer
on NVMe (a folder given by --path, default a temporary folder on the root filesystem). Reported:
the fraction of step time the training thread spent blocked on swap I/O, the swap traffic per second
of blocked time and per second of step time (bytes read + written by the swapper), peak
RSS growth against the model-state size, and `dd` with O_DIRECT on the same filesystem, measured in
the same run (write then read of a file as large as the optimizer state).

    .venv/bin/python tools/bench/bench_zero3_nvme.py [--path /mnt/nvme] [--steps 3]
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import torch


def _dd(folder: str, mib: int) -> dict:
    path = os.path.join(folder, "dd_probe.bin")
    out = {}
    for what, cmd in (("write", ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "oflag=direct"]),
                      ("read", ["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"])):
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = re.search(r"(\d+) bytes.*copied, ([\d.]+) s", res.stderr)
        out[what] = int(m.group(1)) / float(m.group(2)) / 2**20 if m else None
    os.remove(path)
    return out


def _worker(path: str, width: int, depth: int, steps: int) -> dict:
    import ds_train
    from ds_train.zero import Init
    from ds_train.zero.stage3_testing import WideMLP, peak_rss_bytes, peak_rss_reset

    cfg = {
        "train_micro_batch_size_per_gpu": 4, "steps_per_print": 0, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {
            "stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": 1 << 20,
            "offload_param": {"device": "nvme", "nvme_path": path, "buffer_size": width * width},
            "offload_optimizer": {"device": "nvme", "nvme_path": path, "buffer_count": 2},
        },
        "aio": {"block_size": 1 << 20, "queue_depth": 16, "intra_op_parallelism": 2},
    }
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak_rss_reset()
    with Init(config_dict_or_path=cfg):
        model = WideMLP(width, depth)
    psi = sum(p.ds3.numel for p in model.parameters())
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    folder = engine.strategy.swap_folder
    x = torch.randn(4, width).to(torch.bfloat16)
    times = []
    for i in range(steps + 1):
        if i == 1:  # the first step warms up; count from the second
            folder.wait_seconds, folder.bytes_read, folder.bytes_written = 0.0, 0, 0
        t = time.perf_counter()
        engine.backward((engine(x) - 1).pow(2).mean())
        engine.step()
        if i >= 1:
            times.append(time.perf_counter() - t)
    result = {"psi": psi, "step_s": sum(times) / len(times), "wait_s": folder.wait_seconds / len(times),
              "bytes_per_step": (folder.bytes_read + folder.bytes_written) / len(times),
              "engine": folder.aio.engine, "peak_growth": peak_rss_bytes() - before}
    engine.destroy()
    return result


def main() -> None:
    from ds_core.testing import run_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default=None)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    folder = a.path or tempfile.mkdtemp(prefix="ds_nvme_bench_", dir="/var/tmp")
    try:
        res = run_distributed(_worker, 1, folder, a.width, a.depth, a.steps, timeout=1800)[0]
        dd = _dd(folder, max(64, int(12 * res["psi"] / 2**20)))
    finally:
        if a.path is None:
            shutil.rmtree(folder, ignore_errors=True)
    swap_mib_s = res["bytes_per_step"] / max(res["wait_s"], 1e-9) / 2**20
    model_states = 16 * res["psi"]
    print(json.dumps({
        "bench": "zero3_nvme", "params": res["psi"], "aio_engine": res["engine"],
        "step_s": round(res["step_s"], 3), "io_wait_fraction": round(res["wait_s"] / res["step_s"], 3),
        # bytes moved / time blocked: above the device bandwidth when I/O overlaps compute (it should)
        "swap_mib_per_s_of_blocked_time": round(swap_mib_s, 1),
        "swap_mib_per_s_of_step_time": round(res["bytes_per_step"] / res["step_s"] / 2**20, 1),
        "dd_direct_write_mib_s": round(dd["write"], 1) if dd["write"] else None,
        "dd_direct_read_mib_s": round(dd["read"], 1) if dd["read"] else None,
        "swap_over_dd_mean": round(swap_mib_s / ((dd["write"] + dd["read"]) / 2), 3)
        if dd["write"] and dd["read"] else None,
        "peak_rss_growth_mib": round(res["peak_growth"] / 2**20, 1),
        "model_states_mib": round(model_states / 2**20, 1),
        "rss_fraction_of_model_states": round(res["peak_growth"] / model_states, 3),
    }))


if __name__ == "__main__":
    main()
