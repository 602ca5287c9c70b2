"""ZeRO-3 step time and per-rank peak memory vs FSDP2 (`fully_shard`), same model, batch and precision.

GPT-2 (~20M parameters, from a config) on 2 gloo ranks: ours at stage 3 with bf16 parameters and
fp32 master weights + AdamW; FSDP2 with fp32 sharded parameters, MixedPrecisionPolicy(bf16 params,
bf16 reductions) + AdamW, every transformer block and the root wrapped. Both run in the same
invocation, interleaved round by round (FSDP2, ours, DeepSpeed); per run the median step time after
warmup, and the peak resident set growth of rank 0 from before the model is built (libraries already
imported, in all three) to the end (VmHWM; fresh worker processes per run). Reported: the best time and
the largest memory over the rounds.

    .venv/bin/python tools/bench/bench_zero3_step_time.py [--steps 8] [--offload cpu]
        [--rounds 2] [--deepspeed-python /tmp/dsbench3/bin/python]
With --deepspeed-python, DeepSpeed's stage 3 runs too (bench_zero3_ds_worker.py under torchrun in that
interpreter's venv; never in the project venv). Prints one JSON line with ours/baseline ratios (< 1: ours
faster / smaller).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VOCAB = 8192


def _gpt(n_embd: int, n_layer: int, seq: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=seq, n_embd=n_embd, n_layer=n_layer, n_head=8,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def _time(step, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _batch(i: int, rank: int, micro: int, seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (micro, seq), generator=torch.Generator().manual_seed(i * 10 + rank))


def _import_libraries() -> None:
    """Code, not model state: imported before the baseline RSS, as the DeepSpeed worker does too."""
    import transformers  # noqa: F401


def _ours(args: dict) -> dict:
    import ds_train
    import ds_train.engine  # noqa: F401  (ds_train's names are lazy: import the engine's code now)
    from ds_core import comm

    _import_libraries()
    rank = comm.get_rank()
    before = _rss("VmRSS:")
    _peak_reset()
    cfg = {
        "train_micro_batch_size_per_gpu": args["micro"], "steps_per_print": 0, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5_000_000,
                              "stage3_prefetch_bucket_size": 5_000_000, "stage3_param_persistence_threshold": 10_000},
    }
    if args["offload"] == "cpu":
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, *_ = ds_train.initialize(model=_gpt(args["embd"], args["layers"], args["seq"]), config=cfg)

    def step(i: int) -> None:
        ids = _batch(i, rank, args["micro"], args["seq"])
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    seconds = _time(step, args["warmup"], args["steps"])
    peak = _rss("VmHWM:") - before
    engine.destroy()
    return {"seconds": seconds, "peak_growth": peak}


def _fsdp2(args: dict) -> dict:
    from ds_core import comm
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _import_libraries()
    rank, world = comm.get_rank(), comm.get_world_size()
    before = _rss("VmRSS:")
    _peak_reset()
    model = _gpt(args["embd"], args["layers"], args["seq"])
    mesh = init_device_mesh("cpu", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step(i: int) -> None:
        ids = _batch(i, rank, args["micro"], args["seq"])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = _time(step, args["warmup"], args["steps"])
    return {"seconds": seconds, "peak_growth": _rss("VmHWM:") - before}


def _deepspeed(python: str, args: dict) -> dict:
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_zero3_ds_worker.py")
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={args['world']}", "--master_port=29531",
           worker, "--embd", str(args["embd"]), "--layers", str(args["layers"]), "--seq", str(args["seq"]),
           "--micro", str(args["micro"]), "--warmup", str(args["warmup"]), "--steps", str(args["steps"]),
           "--offload", args["offload"]]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
        raise RuntimeError(f"DeepSpeed run failed (exit {res.returncode}); its output is above")
    return json.loads(lines[-1])


def main() -> None:
    from ds_core.testing import run_distributed, shutdown_pool

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--offload", choices=["none", "cpu"], default="none")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best time, largest memory")
    ap.add_argument("--deepspeed-python", default=None, help="python of a venv with deepspeed installed")
    args = vars(ap.parse_args())
    ds_python = args.pop("deepspeed_python")
    def fresh(fn):  # new worker processes: no heap left over from the other run distorts the RSS
        shutdown_pool()
        return run_distributed(fn, args["world"], args, timeout=1800)[0]

    # alternate the three so that slow drift of the machine (other jobs on it) hits all alike
    runs: dict[str, list[dict]] = {"ours": [], "fsdp": [], "ds": []}
    for _ in range(args.pop("rounds")):
        runs["fsdp"].append(fresh(_fsdp2))
        runs["ours"].append(fresh(_ours))
        shutdown_pool()
        if ds_python:
            runs["ds"].append(_deepspeed(ds_python, args))
    shutdown_pool()
    ds = {"deepspeed": runs["ds"][0]["deepspeed"], "seconds": min(r["seconds"] for r in runs["ds"]),
          "peak_growth": max(r["peak_growth"] for r in runs["ds"])} if ds_python else None
    ours = min(r["seconds"] for r in runs["ours"])
    fsdp = min(r["seconds"] for r in runs["fsdp"])
    ours_mem = max(r["peak_growth"] for r in runs["ours"])
    fsdp_mem = max(r["peak_growth"] for r in runs["fsdp"])
    print(json.dumps({
        "bench": "zero3_step_time", "model": "gpt2 ~20M, bf16 compute, fp32 master, AdamW", "world": args["world"],
        "micro_batch": args["micro"], "seq": args["seq"], "offload": args["offload"],
        "ours_s_per_step": round(ours, 4), "fsdp2_s_per_step": round(fsdp, 4),
        "time_ratio_ours_over_fsdp2": round(ours / fsdp, 3),
        "ours_peak_rss_growth_mib": round(ours_mem / 2**20, 1), "fsdp2_peak_rss_growth_mib": round(fsdp_mem / 2**20, 1),
        "memory_ratio_ours_over_fsdp2": round(ours_mem / max(fsdp_mem, 1), 3),
        **({"deepspeed": ds["deepspeed"], "deepspeed_s_per_step": round(ds["seconds"], 4),
            "time_ratio_ours_over_deepspeed": round(ours / ds["seconds"], 3),
            "deepspeed_peak_rss_growth_mib": round(ds["peak_growth"] / 2**20, 1),
            "memory_ratio_ours_over_deepspeed": round(ours_mem / max(ds["peak_growth"], 1), 3)} if ds else {}),
    }))


if __name__ == "__main__":
    main()
