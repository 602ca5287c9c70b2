"""gloo's reduce-scatter and all-gather against what ds_core.comm.prefers_point_to_point() picks instead
(reduce-scatter by point-to-point sends, comm.reduce_scatter_by_sends; one broadcast per rank) and
against an in-place all-reduce (what a reduce-scatter must beat), on 2 ranks, one bucket (default 6.5M
fp32 elements, the ZeRO benches' reduce_bucket_size), in the same run: median time over interleaved rounds and the peak RSS
each collective adds. Prints one JSON line per pair with the time ratio (native / substitute).

    .venv/bin/python tools/bench/bench_gloo_collectives.py [--numel 6553600] [--rounds 10]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ds_core import comm


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(rank: int, port: int, numel: int, rounds: int, dtype_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dtype = getattr(torch, dtype_name)
    half = numel // 2
    buf = torch.randn(numel).to(dtype)
    out = torch.empty(half, dtype=dtype)

    def reduce_scatter() -> None:
        dist.reduce_scatter_tensor(out, buf)

    def all_reduce_in_place() -> None:
        dist.all_reduce(buf)
        out.copy_(buf[rank * half:(rank + 1) * half])

    def sends() -> None:
        comm.reduce_scatter_by_sends(buf)
        out.copy_(buf[rank * half:(rank + 1) * half])

    def all_gather() -> None:
        dist.all_gather_into_tensor(buf, buf[rank * half:(rank + 1) * half])

    def broadcasts() -> None:
        works = [dist.broadcast(buf[r * half:(r + 1) * half], r, async_op=True) for r in range(2)]
        for w in works:
            w.wait()

    cases = {"reduce_scatter": reduce_scatter, "sends": sends, "all_reduce_in_place": all_reduce_in_place,
             "all_gather": all_gather, "broadcasts": broadcasts}
    times: dict[str, list[float]] = {k: [] for k in cases}
    rss_added: dict[str, float] = {}
    # the substitutes first: their RSS growth is measured before the native ones raise the high-water mark
    for name in ("sends", "all_reduce_in_place", "broadcasts", "reduce_scatter", "all_gather"):
        before = _rss_mib()
        cases[name]()
        rss_added[name] = _rss_mib() - before
    for _ in range(rounds):
        for name, fn in cases.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = torch.tensor([statistics.median(times[k]) for k in cases], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    rss = torch.tensor([rss_added[k] for k in cases], dtype=torch.float64)
    dist.all_reduce(rss, op=dist.ReduceOp.MAX)
    if rank == 0:
        m = dict(zip(cases, med.tolist()))
        r = dict(zip(cases, rss.tolist()))
        for native, substitute in (("reduce_scatter", "sends"), ("all_reduce_in_place", "sends"),
                                   ("all_gather", "broadcasts")):
            print(json.dumps({
                "bench": "gloo_collectives", "dtype": dtype_name, "numel": numel, "world": 2,
                "native": native, "substitute": substitute,
                "native_ms": round(m[native] * 1e3, 2), "substitute_ms": round(m[substitute] * 1e3, 2),
                "time_ratio_native_over_substitute": round(m[native] / m[substitute], 3),
                "native_rss_added_mib": round(r[native]), "substitute_rss_added_mib": round(r[substitute]),
                "rounds": rounds,
            }), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=6_553_600)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_zero_step_time import _free_port

    for dtype_name in args.dtypes.split(","):
        # a fresh pair of processes per dtype: peak RSS is per process
        mp.spawn(_worker, args=(_free_port(), args.numel, args.rounds, dtype_name), nprocs=2, join=True)


if __name__ == "__main__":
    main()
