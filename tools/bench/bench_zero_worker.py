"""One timed training run under torchrun (used by bench_zero_step_time.py; not a benchmark by itself).

    torchrun --nproc_per_node 2 tools/bench/bench_zero_worker.py --impl ours --stage 2 --dtype bf16

--impl ours | ddp | fsdp2 | deepspeed (the last one runs in a separate venv that has DeepSpeed).
Prints one JSON line (rank 0): median step seconds and the max per-rank peak RSS; with --phases also
each phase's peak RSS and mean wall time per call (forward, backward, optimizer step, and ours'/DeepSpeed's
internal phases), which is how a step-time ratio is traced to its cause.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist  # baseline libraries (DDP, FSDP2, DeepSpeed) need the raw process group

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zero_common import batch, gpt, timed_steps  # noqa: E402

#: rendezvous and collectives give up (and the rank exits with an error) instead of waiting 30 minutes
INIT_TIMEOUT = datetime.timedelta(minutes=5)


def file_backed_rss() -> int:
    """Bytes of this process's RSS that are mapped files (shared libraries) or shared memory.

    Two byte-identical copies of libtorch in two venvs can differ by ~40 MB here: how many of a
    library's text pages a fresh process maps depends on the page cache state of that file copy, not on
    the program. Peak RSS minus this (it only grows once the libraries are loaded) is the anonymous
    peak: the memory the training code itself holds."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssFile", "RssShmem"):
                fields[key] = int(rest.split()[0]) * 1024
    return sum(fields.values())


def config(stage: int, dtype: str, micro: int) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1_000_000,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True,
                                                  "fused": True}},
        "zero_optimization": {
            "stage": stage,
            "reduce_bucket_size": 6_553_600,
            "allgather_bucket_size": 6_553_600,
            "overlap_comm": True,
        },
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def _instrument(phases, impl: str, engine) -> None:
    """Wrap the parts of a step (ours: the ZeRO strategy's phases; DeepSpeed: its optimizer's) as phases."""
    if engine is None:
        return
    phases.wrap(engine, "forward", "forward")
    phases.wrap(engine, "backward", "backward")
    phases.wrap(engine, "step", "engine.step")
    if impl.startswith("ours"):
        strat = engine.strategy
        for attr in ("after_backward", "_master_grads", "_refresh_params"):
            if hasattr(strat, attr):
                phases.wrap(strat, attr, f"zero.{attr.strip('_')}")
        phases.wrap(strat.optimizer, "step", "torch_optimizer.step")
    else:
        opt = engine.optimizer
        for attr in ("backward_epilogue", "update_hp_grads", "reduce_gradients", "update_lp_params",
                     "_update_model_bf16_weights", "step"):
            if hasattr(opt, attr):
                phases.wrap(opt, attr, f"ds_opt.{attr.strip('_')}")
        phases.wrap(engine, "allreduce_gradients", "ds.allreduce_gradients")
        phases.wrap(opt.optimizer, "step", "torch_optimizer.step")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "ours-native", "ddp", "fsdp2", "deepspeed"], required=True,
                   help="ours: collectives unset (on gloo: reduce-scatter by sends and broadcasts, see "
                        "ds_core.comm.prefers_point_to_point); ours-native: reduce_scatter=true, allgather_partitions=true")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--local_rank", type=int, default=-1)
    p.add_argument("--phases", action="store_true",
                   help="also report the peak RSS of each phase of a step (bench_zero_phases.py)")
    args = p.parse_args()
    torch.set_num_threads(1)
    phases = None
    if args.phases:
        from bench_zero_phases import PhaseRSS

        phases = PhaseRSS()
        phases.mark("init.imports")
    model = gpt()
    if phases:
        phases.mark("init.model")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.impl in ("ours", "ours-native"):
        import ds_train

        ds_train.init_distributed(timeout=INIT_TIMEOUT)
        cfg = config(args.stage, args.dtype, args.micro)
        if args.impl == "ours-native":
            cfg["zero_optimization"].update(reduce_scatter=True, allgather_partitions=True)
        engine, *_ = ds_train.initialize(model=model, config=cfg)

        def step(i: int) -> None:
            ids = batch(i, dist.get_rank(), args.micro)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    elif args.impl == "deepspeed":
        extra_site = os.environ.get("BENCH_DEEPSPEED_SITE")
        if extra_site:  # DeepSpeed's venv after ours on the path: torch is the very files ours runs on
            sys.path.append(extra_site)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", timeout=INIT_TIMEOUT)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=config(args.stage, args.dtype, args.micro),
        )

        def step(i: int) -> None:
            ids = batch(i, dist.get_rank(), args.micro)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    else:
        dist.init_process_group("gloo", timeout=INIT_TIMEOUT)
        if args.impl == "ddp":
            if dtype != torch.float32:
                raise SystemExit("the DDP baseline runs fp32 (it has no fp32 master weights)")
            wrapped = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)
            for block in model.transformer.h:
                fully_shard(block, mp_policy=mp)
            wrapped = fully_shard(model, mp_policy=mp)
        try:  # the same fused AdamW kernel as the engines use
            opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError, ValueError):  # FSDP2's DTensor params, where fused is unsupported
            opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)

        def forward(ids: torch.Tensor) -> torch.Tensor:
            return wrapped(input_ids=ids, labels=ids).loss

        def backward(loss: torch.Tensor) -> None:
            loss.backward()  # DDP: the bucketed all-reduce runs inside

        def step(i: int) -> None:
            ids = batch(i, dist.get_rank(), args.micro)
            run.backward(run.forward(ids))
            opt.step()
            opt.zero_grad(set_to_none=True)

        run = types.SimpleNamespace(forward=forward, backward=backward)  # phases can wrap these

    if phases:
        if args.impl in ("ddp", "fsdp2"):
            phases.wrap(run, "forward", "forward")
            phases.wrap(run, "backward", "backward")
            phases.wrap(opt, "step", "torch_optimizer.step")
        _instrument(phases, args.impl, engine if args.impl != "ddp" and args.impl != "fsdp2" else None)
        phases.mark("init.engine")
        inner = step

        def step(i: int) -> None:
            phases.enter("step.first" if i == 0 else "step.later")
            try:
                inner(i)
            finally:
                phases.exit()

    seconds = timed_steps(step, args.warmup, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    if phases:  # clear_refs resets the high-water mark that ru_maxrss reads: take the phases' maximum
        peak = max(st["peak"] for st in phases.stats.values())
    stats = torch.tensor([seconds, peak, peak - file_backed_rss()], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(
            "RESULT "
            + json.dumps(
                {
                    "impl": args.impl,
                    "stage": args.stage,
                    "dtype": args.dtype,
                    "step_s": stats[0].item(),
                    "peak_rss_bytes": int(stats[1].item()),
                    "peak_anon_bytes": int(stats[2].item()),
                    "world": dist.get_world_size(),
                    "pid": os.getpid(),
                    **({"phases_mib": phases.report()} if phases else {}),
                }
            ),
            flush=True,
        )
    # The result is out: leave without tearing the process group (and gloo's threads) down. Teardown
    # with DDP's reducer still alive hung now and then after RESULT was printed (torch issue 75097
    # reports destroy_process_group hanging at random), and a benchmark has nothing to clean up.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
