"""Train a small GPT-2 (transformers, built from a config) on the bundled Python-docs corpus with ds_train.

    python -m ds_train.launcher.runner --num_procs 2 tools/train_gpt.py --steps 120 --save-dir runs/gpt
    (add --resume to continue from the newest checkpoint in --save-dir)

Prints one progress line per --log-every steps (step, loss, lr, tokens/s, memory), evaluates on the
held-out file at the end and saves a checkpoint. The script is a plain DeepSpeed-style training
loop: `import ds_train as deepspeed` is the only change a DeepSpeed user would notice.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import ds_train as deepspeed
import numpy as np
import torch
from ds_core import comm
from ds_core.accelerator import host_rss_bytes

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default=str(REPO / "data/corpus/python_docs_train.txt"))
    p.add_argument("--valid-file", default=str(REPO / "data/corpus/python_docs_valid.txt"))
    p.add_argument("--tokenizer", default=str(REPO / "data/tokenizer"))
    p.add_argument("--save-dir", default=str(REPO / "runs/gpt"), help="checkpoint directory")
    p.add_argument("--steps", type=int, default=120, help="train until this many optimizer steps in total")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop (and save) at this step although the LR schedule runs to --steps (0: --steps)")
    p.add_argument("--resume", action="store_true", help="load the newest checkpoint in --save-dir first")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-train-tokens", type=int, default=0, help="use only the first N tokens (0 = all)")
    p.add_argument("--summary-json", default=None, help="write final metrics here (rank 0)")
    p.add_argument("--check-fp32", default=None, metavar="SAFETENSORS",
                   help="instead of training: evaluate consolidated fp32 weights (from ds-zero-to-fp32)")
    deepspeed.add_config_arguments(p)
    return p.parse_args(argv)


def ds_config(args: argparse.Namespace) -> dict:
    if args.deepspeed_config:
        return json.loads(Path(args.deepspeed_config).read_text())
    cfg = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": 1.0,
        "steps_per_print": 0,  # this script prints its own progress line (with tokens/s)
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR",
                      "params": {"total_num_steps": args.steps, "warmup_num_steps": max(2, args.steps // 10),
                                 "warmup_type": "linear", "cos_min_ratio": 0.1}},
        "zero_optimization": {"stage": args.zero_stage, "reduce_bucket_size": 2_000_000,
                              "allgather_bucket_size": 2_000_000, "overlap_comm": True},
    }
    if args.dtype != "fp32":
        cfg[args.dtype] = {"enabled": True}
    return cfg


def tokenize(path: str, tokenizer_dir: str, cache_dir: Path) -> np.ndarray:
    """Token ids of a text file, cached next to the checkpoints (rank 0 writes, the others wait)."""
    cache = cache_dir / (Path(path).stem + ".tokens.npy")
    if comm.get_rank() == 0 and not cache.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        tok.model_max_length = 1 << 40  # one long document on purpose; windows are cut below
        text = Path(path).read_text(encoding="utf-8")
        ids = tok(text, return_attention_mask=False)["input_ids"]
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npy")
        np.save(tmp, np.asarray(ids, dtype=np.int32))
        os.replace(tmp, cache)
    if comm.is_initialized():
        comm.barrier()
    return np.load(cache)


class Blocks(torch.utils.data.Dataset):
    """Non-overlapping windows of seq_len + 1 tokens (inputs and shifted labels come from one window)."""

    def __init__(self, ids: np.ndarray, seq_len: int) -> None:
        self.ids, self.seq_len = torch.from_numpy(ids.astype(np.int64)), seq_len

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.ids[i * self.seq_len : i * self.seq_len + self.seq_len]


def build_model(args: argparse.Namespace, tokenizer) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq_len, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=eos, eos_token_id=eos)
    return GPT2LMHeadModel(config)


def check_fp32(args: argparse.Namespace, tokenizer) -> int:
    """Load the consolidated fp32 weights into a fresh model and evaluate (one process, no engine)."""
    from safetensors.torch import load_file

    model = build_model(args, tokenizer)
    state = load_file(args.check_fp32)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embedding
    if missing or result.unexpected_keys:
        raise SystemExit(f"fp32 weights do not fit the model: missing {missing}, unexpected {result.unexpected_keys}")
    model.eval()
    valid = Blocks(np.load(Path(args.save_dir) / "tokens" / (Path(args.valid_file).stem + ".tokens.npy")),
                   args.seq_len)
    with torch.no_grad():
        losses = []
        for b in range(args.eval_batches):
            ids = torch.stack([valid[(b * args.micro_batch + j) % len(valid)] for j in range(args.micro_batch)])
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    val = sum(losses) / len(losses)
    print(f"fp32 weights from {args.check_fp32}: valid loss {val:.4f} (one process, plain transformers)")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({"fp32_valid_loss": val}))
    return 0


@torch.no_grad()
def evaluate(engine, data: Blocks, batches: int, micro: int) -> float:
    engine.eval()
    rank, world = comm.get_rank(), comm.get_world_size()
    total = torch.zeros(2)
    for b in range(rank, batches, world):
        ids = torch.stack([data[(b * micro + j) % len(data)] for j in range(micro)])
        total += torch.tensor([float(engine(input_ids=ids, labels=ids).loss), 1.0])
    if world > 1:
        comm.all_reduce(total)
    engine.train()
    return float(total[0] / max(total[1], 1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.check_fp32:
        return check_fp32(args, tokenizer)
    deepspeed.init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // comm.get_world_size()))
    rank = comm.get_rank()
    save_dir = Path(args.save_dir)
    train_ids = tokenize(args.train_file, args.tokenizer, save_dir / "tokens")
    if args.max_train_tokens:
        train_ids = train_ids[: args.max_train_tokens]
    valid = Blocks(tokenize(args.valid_file, args.tokenizer, save_dir / "tokens"), args.seq_len)
    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    engine, optimizer, loader, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=Blocks(train_ids, args.seq_len),
        config=ds_config(args),
    )
    if rank == 0:
        print(f"GPT-2 {n_params / 1e6:.1f}M params | {len(train_ids) / 1e6:.2f}M train tokens | "
              f"ZeRO stage {engine.zero_optimization_stage()} | {comm.get_world_size()} processes | "
              f"{args.dtype}", flush=True)
    if args.resume:
        path, client = engine.load_checkpoint(str(save_dir))
        if path is None:
            raise SystemExit(f"--resume: no checkpoint in {save_dir}")
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps} (client_state {client})", flush=True)

    tokens_per_step = args.seq_len * engine.train_batch_size()
    window_start, window_tokens = time.perf_counter(), 0
    losses: list[float] = []
    batches = iter(loader)
    stop = args.stop_at or args.steps
    while engine.global_steps < stop:
        try:
            ids = next(batches)
        except StopIteration:
            batches = iter(loader)
            ids = next(batches)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if engine.micro_steps % engine.gradient_accumulation_steps():
            continue  # mid-accumulation: no optimizer step yet
        window_tokens += tokens_per_step
        if engine.global_steps % args.log_every == 0 or engine.global_steps == stop:
            elapsed = time.perf_counter() - window_start
            mean = torch.tensor([sum(losses) / len(losses)])
            if comm.get_world_size() > 1:
                comm.all_reduce(mean)
                mean /= comm.get_world_size()
            if rank == 0:
                print(f"step {engine.global_steps:5d} | loss {mean.item():.4f} | lr {engine.get_lr()[0]:.2e} | "
                      f"grad_norm {engine.get_global_grad_norm() or 0:.2f} | tokens/s {window_tokens / elapsed:,.0f} | "
                      f"rss {host_rss_bytes() / 2**20:,.0f} MiB", flush=True)
            window_start, window_tokens, losses = time.perf_counter(), 0, []
    val = evaluate(engine, valid, args.eval_batches, args.micro_batch)
    engine.save_checkpoint(str(save_dir), client_state={"valid_loss": val, "script": "tools/train_gpt.py"})
    if rank == 0:
        print(f"valid loss {val:.4f} (perplexity {math.exp(val):.1f}) | saved {save_dir}/global_step"
              f"{engine.global_steps}", flush=True)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps({"steps": engine.global_steps, "valid_loss": val}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
