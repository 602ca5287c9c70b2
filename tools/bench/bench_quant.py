"""Weight-only INT8/INT4 fused dequantize+matmul vs fp32 torch.matmul, 4096x4096 weight, batch 1 and 16.

For each (bits, batch): our `quantized_matmul` and the fp32 baseline `x @ W.T` are timed round-robin
in the same run; the error is the max abs difference from the reference (x @ dequantize(W).T in fp32),
and, for information, from the unquantized fp32 product. Prints one JSON line.

    .venv/bin/python tools/bench/bench_quant.py [--dim 4096] [--group 128] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def log(msg: str) -> None:
    print(f"[bench_quant] {msg}", file=sys.stderr, flush=True)


def timed_interleaved(fns: dict, iters: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch/kernel threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import ds_kernels
    from ds_kernels import reference
    from ds_kernels.quant import quantize, quantized_matmul

    torch.manual_seed(0)
    w = torch.randn(args.dim, args.dim) * 0.02
    result = {
        "bench": "quant_matmul",
        "dim": args.dim,
        "group_size": args.group,
        "threads": torch.get_num_threads(),
        "isa": ds_kernels.isa(),
        "cases": {},
    }
    for bits in (8, 4):
        qt = quantize(w, bits, args.group, symmetric=True)
        for batch in (1, 16):
            x = torch.randn(batch, args.dim)
            fns = {"ours": lambda x=x, qt=qt: quantized_matmul(x, qt), "fp32": lambda x=x: x @ w.t()}
            t = timed_interleaved(fns, args.iters)
            ours = quantized_matmul(x, qt)
            ref = reference.quantized_matmul(x, qt.unpacked(), qt.scale, qt.zero_point, args.group)
            case = {
                "ours_ms": round(t["ours"] * 1e3, 3),
                "fp32_matmul_ms": round(t["fp32"] * 1e3, 3),
                "speedup_vs_fp32": round(t["fp32"] / t["ours"], 2),
                "max_abs_err_vs_reference": float((ours - ref).abs().max()),
                "max_abs_err_vs_fp32_weight": float((ours - x @ w.t()).abs().max()),
                "weight_bytes": qt.nbytes(),
            }
            result["cases"][f"int{bits}_batch{batch}"] = case
            log(f"int{bits} batch {batch}: {case}")
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
