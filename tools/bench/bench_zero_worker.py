"""One timed training run under torchrun (used by bench_zero_step_time.py; not a benchmark by itself).

    torchrun --nproc_per_node 2 tools/bench/bench_zero_worker.py --impl ours --stage 2 --dtype bf16

--impl ours | ddp | fsdp2 | deepspeed (the last one runs in a separate venv that has DeepSpeed).
Prints one JSON line (rank 0): median step seconds and the max per-rank peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist  # baseline libraries (DDP, FSDP2, DeepSpeed) need the raw process group

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zero_common import batch, gpt, timed_steps  # noqa: E402


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "ours-gloo", "ddp", "fsdp2", "deepspeed"], required=True,
                   help="ours-gloo: ZeRO with reduce_scatter=false, allgather_partitions=false (all-reduce and "
                        "broadcasts, which gloo implements much faster than reduce-scatter/all-gather)")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = gpt()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.impl in ("ours", "ours-gloo"):
        import ds_train

        ds_train.init_distributed()
        cfg = config(args.stage, args.dtype, args.micro)
        if args.impl == "ours-gloo":
            cfg["zero_optimization"].update(reduce_scatter=False, allgather_partitions=False)
        engine, *_ = ds_train.initialize(model=model, config=cfg)

        def step(i: int) -> None:
            ids = batch(i, dist.get_rank(), args.micro)
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
    elif args.impl == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
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
        dist.init_process_group("gloo")
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

        def step(i: int) -> None:
            ids = batch(i, dist.get_rank(), args.micro)
            wrapped(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    seconds = timed_steps(step, args.warmup, args.steps)
    stats = torch.tensor([seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0])
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
                    "world": dist.get_world_size(),
                    "pid": os.getpid(),
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
