"""Step time (and per-rank peak RSS) on 2 ranks for a ~20M-parameter GPT-2: ds_train ZeRO vs DDP, FSDP2
and DeepSpeed, the same model, batch (4 x 128 tokens per rank), optimizer (AdamW) and precision, in one run.

- fp32: ours stage 0/1/2 vs torch DDP (bucket 25 MB; ours uses 25 MB buckets too) and FSDP2 (fully_shard);
- bf16 (fp32 master weights): ours stage 0/1/2 vs FSDP2 (MixedPrecisionPolicy bf16) and DeepSpeed 0.19.8.
DeepSpeed runs from a separate venv (default /tmp/dsbench, override with DS_BENCH_PYTHON); it is skipped
with a note when that interpreter is missing. Every run is 2 fresh processes (env:// rendezvous) so peak RSS is per run;
rounds are interleaved and the median over rounds is reported. Prints one JSON line per comparison
(peak RSS, and peak RSS less file-backed pages, see bench_zero_worker.file_backed_rss). A run that fails
or outlives --run-timeout is killed (its process groups) and retried once; a second failure is reported
as a JSON line with "error" instead of stopping the benchmark.

    .venv/bin/python tools/bench/bench_zero_step_time.py [--rounds 2] [--steps 8] [--dtypes bf16]
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
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "bench_zero_worker.py"


def _port_candidates() -> range:
    """Ports outside the kernel's ephemeral range (from which outgoing connections take their local port)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(max(1024, lo - 10000), lo) if lo - 1024 >= 2000 else range(hi + 1, 65536)


def _free_port() -> int:
    """A free rendezvous port *below* the ephemeral range.

    Why not bind(0): that port lies inside the ephemeral range. While rank 0 is still importing torch,
    rank 1's store client keeps reconnecting to it from fresh ephemeral local ports; when the kernel
    picks the destination port itself the connect succeeds as a TCP simultaneous open, the client is
    connected to itself, and both ranks wait forever (the same bug class as ZOOKEEPER-2101 / KAFKA-1836).
    Any other process's outgoing connection may also take the port before rank 0 binds it."""
    import random
    import socket

    ports = _port_candidates()
    for port in random.sample(ports, min(200, len(ports))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the rank's whole session (it was started with start_new_session) while it is unreaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_once(python: str, impl: str, stage: int, dtype: str, steps: int, warmup: int, timeout: float,
              extra_env: dict[str, str] | None = None) -> dict:
    """Start the 2 ranks (env:// rendezvous), each in its own session; output goes to files, not pipes
    (a rank blocked on a full pipe while the other waits in a collective would deadlock both)."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench_zero_") as tmp:
        procs, logs = [], []
        for rank in range(2):
            env = {**os.environ, "DS_ACCELERATOR": "cpu", "DS_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1",
                   "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(extra_env or {})}
            cmd = [python, str(WORKER), "--impl", impl, "--stage", str(stage), "--dtype", dtype,
                   "--steps", str(steps), "--warmup", str(warmup)]
            out, err = Path(tmp, f"rank{rank}.out"), Path(tmp, f"rank{rank}.err")
            logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while any(p.poll() is None for p in procs):
                dead = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
                if dead:  # the other rank would wait in a collective until its own timeout
                    failure = f"rank {dead[0][0]} exited with code {dead[0][1]}"
                    break
                if time.monotonic() > deadline:
                    failure = f"timed out after {timeout:.0f} s (port {port})"
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                _kill_group(p)
        codes = [p.returncode for p in procs]
        if failure is None and any(codes):
            failure = f"exit codes {codes}"
        for line in logs[0][0].read_text().splitlines():
            if failure is None and line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        tails = " | ".join(f"rank {r}: " + err.read_text()[-600:].replace("\n", " / ") for r, (_, err) in enumerate(logs))
        return {"error": failure or "no RESULT line", "stderr_tail": tails}


def _run(python: str, impl: str, stage: int, dtype: str, steps: int, warmup: int, timeout: float,
         extra_env: dict[str, str] | None = None) -> dict:
    """One measurement; a run that fails or hangs (e.g. a rank killed on a busy machine) is retried once."""
    for attempt in (1, 2):
        res = _run_once(python, impl, stage, dtype, steps, warmup, timeout, extra_env)
        if "error" not in res:
            return res
        print(f"# {impl} stage {stage} {dtype} failed (attempt {attempt}): {res['error']}\n{res['stderr_tail']}",
              file=sys.stderr, flush=True)
    return res


def _deepspeed_launch(ds_py: str, own_torch: bool) -> tuple[str, dict[str, str], str]:
    """(python, extra env, how) to run DeepSpeed with.

    By default DeepSpeed runs on our interpreter with its venv's site-packages appended to sys.path, so
    torch is loaded from the very same files as ours (the torch versions must match). Two byte-identical
    copies of libtorch in two venvs map different amounts of text at import (see
    bench_zero_worker.file_backed_rss), which would skew plain peak-RSS ratios by ~35 MB."""
    probe = subprocess.run(
        [ds_py, "-c", "import os, torch, deepspeed; print(torch.__version__); "
                      "print(os.path.dirname(os.path.dirname(deepspeed.__file__)))"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    lines = probe.stdout.split()
    import torch

    if own_torch or probe.returncode != 0 or len(lines) < 2 or lines[0] != torch.__version__:
        why = "asked" if own_torch else f"torch {lines[0] if lines else '?'} there vs {torch.__version__} here"
        return ds_py, {}, f"DeepSpeed on its venv's own torch ({why})"
    return sys.executable, {"BENCH_DEEPSPEED_SITE": lines[1]}, f"DeepSpeed from {lines[1]} on our torch files"


DS_STAGE0_NOTE = ("DeepSpeed's stage 0 with bf16 runs its BF16_Optimizer, which partitions the fp32 master weights and "
                  "the optimizer state over the data-parallel ranks (ZeRO-1-like: 2+4+12/N bytes per parameter); "
                  "ours keeps plain data-parallel semantics at stage 0 (every rank holds all of it: 2+2+12)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impls", default="ours,ours-native,ddp,fsdp2,deepspeed",
                    help="comma-separated subset of: ours, ours-native, ddp, fsdp2, deepspeed")
    ap.add_argument("--deepspeed-own-torch", action="store_true",
                    help="run DeepSpeed on its venv's own torch files instead of ours (see _deepspeed_launch)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of: fp32, bf16")
    ap.add_argument("--stages", default="0,1,2", help="comma-separated subset of our stages: 0, 1, 2 (the "
                    "baselines run whenever a comparison needs them)")
    ap.add_argument("--run-timeout", type=float, default=300.0,
                    help="seconds one 2-rank run may take before both ranks' process groups are killed")
    args = ap.parse_args()
    impls, dtypes = set(args.impls.split(",")), set(args.dtypes.split(","))
    stages = {int(v) for v in args.stages.split(",")}
    ours_py = sys.executable
    ds_py = os.environ.get("DS_BENCH_PYTHON", "/tmp/dsbench/bin/python")
    have_ds = Path(ds_py).exists()
    runs = [("ours", s, "fp32") for s in (0, 1, 2)] + [("ours-native", s, "fp32") for s in (1, 2)]
    runs += [("ddp", 0, "fp32"), ("fsdp2", 3, "fp32")]
    runs += [("ours", s, "bf16") for s in (0, 1, 2)] + [("ours-native", s, "bf16") for s in (1, 2)]
    runs += [("fsdp2", 3, "bf16")]
    if have_ds:
        runs += [("deepspeed", s, "bf16") for s in (0, 1, 2)]
    runs = [r for r in runs if r[0] in impls and r[2] in dtypes
            and (r[0] in ("ddp", "fsdp2") or r[1] in stages)]
    if any(r[0] == "deepspeed" for r in runs):
        ds_launch = _deepspeed_launch(ds_py, args.deepspeed_own_torch)
        print(json.dumps({"bench": "zero_step_time", "note": ds_launch[2]}), flush=True)
    results: dict[tuple, list[dict]] = {r: [] for r in runs}
    errors: dict[tuple, list[str]] = {r: [] for r in runs}
    for rnd in range(args.rounds):
        for impl, stage, dtype in runs:
            py, env = ds_launch[:2] if impl == "deepspeed" else (ours_py, {})
            res = _run(py, impl, stage, dtype, args.steps, args.warmup, args.run_timeout, env)
            if "error" in res:
                errors[(impl, stage, dtype)].append(res["error"])
                print(json.dumps({"bench": "zero_step_time", "run": f"{impl} stage {stage} {dtype}", "round": rnd,
                                  **res}), flush=True)
                continue
            results[(impl, stage, dtype)].append(res)
            print(f"# round {rnd} {impl} stage {stage} {dtype}: {res['step_s']:.3f} s/step, "
                  f"peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB (anonymous {res['peak_anon_bytes'] / 2**20:.0f})",
                  file=sys.stderr, flush=True)

    def med(key: tuple, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    def line(ours: tuple, base: tuple, what: str) -> None:
        if ours not in results or base not in results:
            return
        out = {"bench": "zero_step_time", "what": what, "ours": f"{ours[0]} stage {ours[1]} {ours[2]}",
               "baseline": f"{base[0]} {base[2]}" + (f" stage {base[1]}" if base[0] == "deepspeed" else "")}
        if not results[ours] or not results[base]:
            print(json.dumps({**out, "error": "; ".join(errors[ours] + errors[base])}), flush=True)
            return
        out.update({
            "ours_step_s": round(med(ours, "step_s"), 4), "baseline_step_s": round(med(base, "step_s"), 4),
            "time_ratio": round(med(ours, "step_s") / med(base, "step_s"), 3),
            "ours_peak_rss_mib": round(med(ours, "peak_rss_bytes") / 2**20),
            "baseline_peak_rss_mib": round(med(base, "peak_rss_bytes") / 2**20),
            "rss_ratio": round(med(ours, "peak_rss_bytes") / med(base, "peak_rss_bytes"), 3),
            # peak RSS less file-backed pages (shared libraries): see bench_zero_worker.file_backed_rss
            "ours_peak_anon_mib": round(med(ours, "peak_anon_bytes") / 2**20),
            "baseline_peak_anon_mib": round(med(base, "peak_anon_bytes") / 2**20),
            "anon_ratio": round(med(ours, "peak_anon_bytes") / med(base, "peak_anon_bytes"), 3),
            "rounds": len(results[ours]), "steps": args.steps,
        })
        if base[0] == "deepspeed" and base[1] == 0:
            out["note"] = DS_STAGE0_NOTE
        if errors[ours] or errors[base]:
            out["failed_runs"] = errors[ours] + errors[base]
        print(json.dumps(out), flush=True)

    for ours in ("ours", "ours-native"):
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
