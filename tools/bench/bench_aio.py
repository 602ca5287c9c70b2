"""Tensor file I/O bandwidth: ds_kernels.aio (each engine) vs `dd` with O_DIRECT, same filesystem, same run;
plus how much a matmul loop slows down while a transfer runs in the background.

    .venv/bin/python tools/bench/bench_aio.py [--size-mib 2048] [--dir /tmp] [--block-mib 1]

Write: ours writes an aligned host tensor with O_DIRECT; dd writes /dev/zero with oflag=direct.
Read: ours reads it back with O_DIRECT; dd reads it with iflag=direct. Neither goes through the page
cache, so the figures are device bandwidth. Overlap: matmul iterations per second while ours writes,
relative to the same loop with no I/O. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def log(msg: str) -> None:
    print(f"[bench_aio] {msg}", file=sys.stderr, flush=True)


def dd_gbps(args: list[str], nbytes: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return nbytes / (time.perf_counter() - t0) / 1e9


def matmul_rate(seconds: float, stop=None) -> float:
    """Iterations per second of a 512x512 matmul loop, for `seconds` or until stop() is true."""
    a = torch.randn(512, 512)
    b = torch.randn(512, 512)
    n, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        elapsed = time.perf_counter() - t0
        if (stop is not None and stop()) or (stop is None and elapsed >= seconds):
            return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--block-mib", type=int, default=1)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--queue-depth", type=int, default=32)
    args = ap.parse_args()
    from ds_kernels import aio

    nbytes = args.size_mib << 20
    workdir = tempfile.mkdtemp(prefix="bench_aio_", dir=args.dir)
    path, dd_path = os.path.join(workdir, "ours.bin"), os.path.join(workdir, "dd.bin")
    buf = aio.aligned_empty(nbytes, torch.uint8)
    buf.fill_(1)  # touch every page so the first transfer does not pay for page faults
    result = {
        "bench": "aio",
        "bytes": nbytes,
        "dir": args.dir,
        "block_bytes": args.block_mib << 20,
        "threads": args.threads,
        "queue_depth": args.queue_depth,
        "engines": {},
    }
    try:
        bs = f"bs={args.block_mib}M"
        count = f"count={args.size_mib // args.block_mib}"
        log("dd write / read ...")
        dd_w = dd_gbps(["if=/dev/zero", f"of={dd_path}", bs, count, "oflag=direct"], nbytes)
        dd_r = dd_gbps([f"if={dd_path}", "of=/dev/null", bs, "iflag=direct"], nbytes)
        os.remove(dd_path)
        result.update(dd_write_gbps=round(dd_w, 3), dd_read_gbps=round(dd_r, 3))
        for engine in [e for e in aio.engines() if e != "python-threads"]:
            io = aio.AsyncIO(
                block_size=args.block_mib << 20,
                queue_depth=args.queue_depth,
                threads=args.threads,
                engine=engine,
            )
            log(f"{engine}: write ...")
            t0 = time.perf_counter()
            io.submit_write(buf, path).wait()
            w = nbytes / (time.perf_counter() - t0) / 1e9
            log(f"{engine}: read ...")
            t0 = time.perf_counter()
            io.submit_read(buf, path).wait()
            r = nbytes / (time.perf_counter() - t0) / 1e9
            result["engines"][engine] = {
                "write_gbps": round(w, 3),
                "read_gbps": round(r, 3),
                "write_vs_dd": round(w / dd_w, 3),
                "read_vs_dd": round(r / dd_r, 3),
            }
            os.remove(path)
        engine = aio.engines()[0]
        io = aio.AsyncIO(
            block_size=args.block_mib << 20, queue_depth=args.queue_depth, threads=args.threads, engine=engine
        )
        log(f"overlap with {engine}: matmul loop alone / during back-to-back writes / alone ...")
        # One compute thread: on 2 cores a 2-thread matmul loop is at the mercy of any other process
        # (its OpenMP barrier waits for a descheduled thread), which swamps the effect being measured.
        torch.set_num_threads(1)
        matmul_rate(0.5)  # warm-up
        alone_before = matmul_rate(2.0)
        t_end = time.perf_counter() + 2.0
        rates = []
        while time.perf_counter() < t_end:  # keep the device busy for ~2 s while the loop computes
            req = io.submit_write(buf, path)
            rates.append(matmul_rate(0.0, stop=req.done))
            req.wait()
        alone_after = matmul_rate(2.0)
        alone = (alone_before + alone_after) / 2
        during = sum(rates) / len(rates)
        result["overlap"] = {
            "engine": engine,
            "compute_threads": 1,
            "matmul_per_s_alone": round(alone, 1),
            "matmul_per_s_during_write": round(during, 1),
            "compute_slowdown": round(1 - during / alone, 3),
            "writes": len(rates),
        }
    finally:
        for p in (path, dd_path):
            if os.path.exists(p):
                os.remove(p)
        os.rmdir(workdir)
    result["load_avg_1m"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
