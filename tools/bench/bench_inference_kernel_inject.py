"""Kernel injection: init_inference(replace_with_kernel_inject=True) vs the same transformers model.

A SmolLM2-135M-shaped Llama (30 layers, hidden 576, GQA 9/3 heads; random weights: speed does not
depend on the values) in fp32 on CPU. Measures greedy generate() of --new-tokens tokens after a
--prompt-len prompt (batch --batch), both models run alternately --iters times; reports the median.
Also checks that both produce the same tokens. Prints one JSON line.

    .venv/bin/python tools/bench/bench_inference_kernel_inject.py [--threads 1] [--iters 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from ds_inference import init_inference
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig


def log(msg: str) -> None:
    print(f"[bench_inference_kernel_inject] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )
    base = AutoModelForCausalLM.from_config(cfg).eval()
    injected = init_inference(copy.deepcopy(base), replace_with_kernel_inject=True)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len))
    gc = GenerationConfig(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )

    def run(model):
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            return time.perf_counter() - t, out

    run(base), run(injected)  # warm-up
    times = {"baseline": [], "ours": []}
    same = True
    for i in range(args.iters):
        tb, ob = run(base)
        to, oo = run(injected)
        times["baseline"].append(tb)
        times["ours"].append(to)
        same = same and torch.equal(ob, oo)
        log(f"iter {i}: baseline {tb:.2f}s, injected {to:.2f}s")
    b, o = statistics.median(times["baseline"]), statistics.median(times["ours"])
    tokens = args.batch * args.new_tokens
    print(
        json.dumps(
            {
                "bench": "kernel_inject_smollm2_shape_cpu",
                "threads": args.threads,
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "ours_s": o,
                "baseline_s": b,
                "ours_tok_s": tokens / o,
                "baseline_tok_s": tokens / b,
                "speedup": b / o,
                "same_tokens": same,
                "report": injected.report["kernel_inject"],
            }
        )
    )


if __name__ == "__main__":
    main()
