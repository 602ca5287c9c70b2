"""Step time (and per-rank peak RSS) on 2 ranks for a ~20M-parameter GPT-2: ds_train ZeRO vs DDP, FSDP2
and DeepSpeed, the same model, batch (4 x 128 tokens per rank), optimizer (AdamW) and precision, in one run.

- fp32: ours stage 0/1/2 vs torch DDP (bucket 25 MB; ours uses 25 MB buckets too) and FSDP2 (fully_shard);
- bf16 (fp32 master weights): ours stage 0/1/2 vs FSDP2 (MixedPrecisionPolicy bf16) and DeepSpeed 0.19.8.
DeepSpeed runs from a separate venv (default /tmp/dsbench, override with DS_BENCH_PYTHON); it is skipped
with a note when that interpreter is missing. Every run is 2 fresh processes (env:// rendezvous) so peak RSS is per run;
rounds are interleaved and the median over rounds is reported. Prints one JSON line per comparison.

    .venv/bin/python tools/bench/bench_zero_step_time.py [--rounds 2] [--steps 8]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_zero_worker.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(python: str, impl: str, stage: int, dtype: str, steps: int, warmup: int) -> dict:
    """Start the 2 ranks ourselves (env:// rendezvous), each in its own session so a hang can be killed."""
    for attempt in range(2):  # a run that dies or hangs (e.g. a rank killed on a busy machine) is retried once
        port = _free_port()
        procs = []
        for rank in range(2):
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            cmd = [python, str(WORKER), "--impl", impl, "--stage", str(stage), "--dtype", dtype,
                   "--steps", str(steps), "--warmup", str(warmup)]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                          start_new_session=True))
        try:
            outs = [p.communicate(timeout=600) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
            print(f"# {impl} stage {stage} {dtype}: timed out (attempt {attempt + 1})", file=sys.stderr, flush=True)
            continue
        for line in outs[0][0].splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        print(f"# {impl} stage {stage} {dtype} failed (attempt {attempt + 1}):\n{outs[0][1][-2000:]}",
              file=sys.stderr, flush=True)
    raise RuntimeError(f"{impl} stage {stage} {dtype} failed twice; see the messages above")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impls", default="ours,ours-gloo,ddp,fsdp2,deepspeed",
                    help="comma-separated subset of: ours, ours-gloo, ddp, fsdp2, deepspeed")
    args = ap.parse_args()
    impls = set(args.impls.split(","))
    ours_py = sys.executable
    ds_py = os.environ.get("DS_BENCH_PYTHON", "/tmp/dsbench/bin/python")
    have_ds = Path(ds_py).exists()
    runs = [("ours", s, "fp32") for s in (0, 1, 2)] + [("ours-gloo", s, "fp32") for s in (1, 2)]
    runs += [("ddp", 0, "fp32"), ("fsdp2", 3, "fp32")]
    runs += [("ours", s, "bf16") for s in (0, 1, 2)] + [("ours-gloo", s, "bf16") for s in (1, 2)]
    runs += [("fsdp2", 3, "bf16")]
    if have_ds:
        runs += [("deepspeed", s, "bf16") for s in (0, 1, 2)]
    runs = [r for r in runs if r[0] in impls]
    results: dict[tuple, list[dict]] = {r: [] for r in runs}
    for rnd in range(args.rounds):
        for impl, stage, dtype in runs:
            py = ds_py if impl == "deepspeed" else ours_py
            res = _run(py, impl, stage, dtype, args.steps, args.warmup)
            results[(impl, stage, dtype)].append(res)
            print(f"# round {rnd} {impl} stage {stage} {dtype}: {res['step_s']:.3f} s/step, "
                  f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)

    def med(key: tuple, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    def line(ours: tuple, base: tuple, what: str) -> None:
        if ours not in results or base not in results:
            return
        out = {"bench": "zero_step_time", "what": what, "ours": f"{ours[0]} stage {ours[1]} {ours[2]}",
               "baseline": f"{base[0]} {base[2]}" + (f" stage {base[1]}" if base[0] == "deepspeed" else ""),
               "ours_step_s": round(med(ours, "step_s"), 4), "baseline_step_s": round(med(base, "step_s"), 4),
               "time_ratio": round(med(ours, "step_s") / med(base, "step_s"), 3),
               "ours_peak_rss_mib": round(med(ours, "peak_rss_bytes") / 2**20),
               "baseline_peak_rss_mib": round(med(base, "peak_rss_bytes") / 2**20),
               "rss_ratio": round(med(ours, "peak_rss_bytes") / med(base, "peak_rss_bytes"), 3),
               "rounds": args.rounds, "steps": args.steps}
        print(json.dumps(out), flush=True)

    for ours in ("ours", "ours-gloo"):
        for s in (0, 1, 2):
            line((ours, s, "fp32"), ("ddp", 0, "fp32"), "vs DDP, fp32")
        for s in (1, 2):
            line((ours, s, "fp32"), ("fsdp2", 3, "fp32"), "vs FSDP2, fp32")
            line((ours, s, "bf16"), ("fsdp2", 3, "bf16"), "vs FSDP2, bf16 mixed precision")
        if have_ds:
            for s in (0, 1, 2):
                line((ours, s, "bf16"), ("deepspeed", s, "bf16"), "vs DeepSpeed 0.19.8, bf16 (same config)")
    if not have_ds and "deepspeed" in impls:
        print(json.dumps({"bench": "zero_step_time", "note": f"DeepSpeed skipped: {ds_py} not found"}))


if __name__ == "__main__":
    main()
