"""DeepSpeed's ZeRO-3 on the bench's GPT-2: run by bench_zero3_step_time.py under torchrun in a SEPARATE venv.

Never imported by our packages; needs `deepspeed` and `transformers` in the interpreter that runs it
(e.g. python3 -m venv /tmp/dsbench3 && /tmp/dsbench3/bin/pip install torch==2.13.0 deepspeed transformers).
Rank 0 prints one JSON line: median step seconds and peak RSS growth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

VOCAB = 8192


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--offload", choices=["none", "cpu"], default="none")
    a = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import transformers

    transformers.logging.set_verbosity_error()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // torch.distributed.get_world_size()))
    before = _rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=a.seq, n_embd=a.embd, n_layer=a.layers, n_head=8,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    ds_cfg = {
        "train_micro_batch_size_per_gpu": a.micro, "steps_per_print": 10**9, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": a.offload == "none"}},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5_000_000,
                              "stage3_prefetch_bucket_size": 5_000_000, "stage3_param_persistence_threshold": 10_000},
    }
    if a.offload == "cpu":
        ds_cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        ds_cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
    times = []
    for i in range(a.warmup + a.steps):
        ids = torch.randint(0, VOCAB, (a.micro, a.seq), generator=torch.Generator().manual_seed(i * 10 + rank))
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    if rank == 0:
        print(json.dumps({"seconds": statistics.median(times), "peak_growth": _rss("VmHWM:") - before,
                          "deepspeed": deepspeed.__version__}))


if __name__ == "__main__":
    main()
