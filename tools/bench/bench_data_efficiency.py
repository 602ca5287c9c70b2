"""Data efficiency on real text: a small GPT with and without a seqlen curriculum and random-LTD.

Every arm trains the same GPT-2-style model (random init from a config) on the bundled Python-docs
corpus with the same seeds and the same token budget (baseline steps x batch x seqlen), and reports
validation loss (held-out file, full-length sequences) at equal numbers of consumed tokens, plus
wall-clock per step and to the budget. Arms run interleaved per seed so machine load hits them alike.

- baseline:          every step trains on full-length sequences.
- seqlen_curriculum: DeepSpeed's legacy curriculum (fixed_linear seqlen 16 -> full); it needs more
                     steps to consume the same tokens (shorter sequences early).
- random_ltd:        the middle layers keep a growing random subset of tokens; the same tokens
                     are consumed per step, so equal tokens = equal steps.

Prints progress to stderr and one JSON line (means over seeds, and ratios against the baseline).
Runs through ds_train.initialize when it works (`--trainer auto`), else a plain torch loop driving
the same `ds_data.integration.DataEfficiency` hooks; the JSON says which.

    .venv/bin/python tools/bench/bench_data_efficiency.py            # ~10 min on 2 idle cores
    .venv/bin/python tools/bench/bench_data_efficiency.py --steps 40 --seeds 1   # smoke run
    .venv/bin/python tools/bench/bench_data_efficiency.py --mode analyzer        # index memory cap

``--mode ltd_speed`` times one training step (forward + backward + AdamW) of a layer-heavy GPT-2
(`--speed-*` sizes) with and without random-LTD at a fixed kept fraction, interleaved, median of
`--speed-reps`: the compute random-LTD can save when the transformer layers, not the LM head,
dominate.

``--mode analyzer`` builds one metric index of `--analyzer-samples` values twice, under a memory cap
and in memory, and reports numpy's peak traced allocation of each (memmapped files excluded), their
ratio, and whether the files are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def log(msg: str) -> None:
    print(f"[bench_data_efficiency] {msg}", file=sys.stderr, flush=True)


def tokenize(path: Path, cache_dir: Path) -> np.ndarray:
    """Token ids of a text file, cached by content hash (tokenizing the corpus takes seconds)."""
    digest = hashlib.sha1(path.read_bytes()).hexdigest()[:16]
    cache = cache_dir / f"{path.stem}.{digest}.npy"
    if cache.is_file():
        return np.load(cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "data" / "tokenizer"))
    tok.model_max_length = 1 << 30
    ids = np.asarray(tok(path.read_text(encoding="utf-8"))["input_ids"], dtype=np.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, ids)
    tmp.replace(cache)
    return ids


def make_model(args, seed: int):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=args.layers,
        n_embd=args.hidden,
        n_head=args.heads,
        vocab_size=8192,
        n_positions=args.seqlen,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return transformers.GPT2LMHeadModel(cfg)


def ds_config(args, arm: str, seed: int) -> dict:
    cfg = {
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.01}},
    }
    if arm == "seqlen_curriculum":
        cfg["curriculum_learning"] = {
            "enabled": True,
            "curriculum_type": "seqlen",
            "min_difficulty": args.curriculum_min,
            "max_difficulty": args.seqlen,
            "schedule_type": "fixed_linear",
            "schedule_config": {
                "total_curriculum_step": max(1, int(args.curriculum_frac * args.steps)),
                "difficulty_step": 8,
            },
        }
    if arm == "random_ltd":
        cfg["data_efficiency"] = {
            "enabled": True,
            "seed": seed,
            "data_routing": {
                "enabled": True,
                "random_ltd": {
                    "enabled": True,
                    "total_layer_num": args.layers,
                    "random_ltd_layer_num": args.layers - 2,
                    "random_ltd_layer_id": list(range(1, args.layers - 1)),
                    "model_mask_name": "attention_mask",
                    "model_type": "decoder",
                    "hidden_state_order": "batch_seq_dim",
                    "random_ltd_schedule": {
                        "min_value": args.ltd_min,
                        "max_value": args.seqlen,
                        "schedule_type": "fixed_linear",
                        "schedule_config": {
                            "require_steps": max(1, int(args.ltd_frac * args.steps)),
                            "seq_per_step": 16,
                        },
                    },
                },
            },
        }
    return cfg


class Trainer:
    """One training run: through ds_train's engine, or a torch loop calling the same ds-data hooks."""

    def __init__(self, kind: str, model, cfg: dict, args) -> None:
        self.kind = kind
        if kind == "ds_train":
            import ds_train

            self.engine, _, _, _ = ds_train.initialize(model=model, config=cfg)
            self.model = self.engine.module
            hook = self.engine.data_efficiency
            self.de = hook.impl if hook is not None else None
        else:
            from ds_data.integration import DataEfficiency

            self.de = DataEfficiency.from_ds_config(cfg)
            self.model = self.de.wrap_model(model)
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.01)
            self.step_count = 0

    def train_step(self, ids: torch.Tensor) -> int:
        """One optimizer step; returns the tokens it consumed."""
        if self.kind == "ds_train":
            out = self.engine(input_ids=ids, labels=ids)
            self.engine.backward(out.loss)
            self.engine.step()
        else:
            self.model.train()
            batch = {"input_ids": ids, "labels": ids}
            if self.de.enabled:
                self.de.on_step_begin(self.step_count)
                batch = self.de.transform_batch(batch)
            out = self.model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step_count += 1
        seqlen = self.de.current_seqlen if self.de is not None and self.de.current_seqlen else ids.shape[1]
        return ids.shape[0] * min(seqlen, ids.shape[1])

    @torch.no_grad()
    def val_loss(self, val: torch.Tensor, batch: int) -> float:
        was = self.model.training
        self.model.eval()
        losses = [
            self.model(input_ids=val[i : i + batch], labels=val[i : i + batch]).loss.item()
            for i in range(0, val.shape[0], batch)
        ]
        self.model.train(was)
        return float(np.mean(losses))


def run_arm(args, arm: str, seed: int, train: np.ndarray, val: torch.Tensor, trainer_kind: str) -> dict:
    model = make_model(args, seed)
    trainer = Trainer(trainer_kind, model, ds_config(args, arm, seed), args)
    rng = np.random.default_rng(seed)
    budget = args.steps * args.batch * args.seqlen
    marks = [int(f * budget) for f in FRACTIONS]
    consumed, steps, step_times, losses = 0, 0, [], {}
    max_steps = 4 * args.steps  # a guard; the curriculum needs ~1.3x the baseline steps
    while consumed < budget and steps < max_steps:
        starts = rng.integers(0, train.shape[0] - args.seqlen, size=args.batch)
        ids = torch.from_numpy(np.stack([train[s : s + args.seqlen] for s in starts]).astype(np.int64))
        t0 = time.perf_counter()
        consumed += trainer.train_step(ids)
        step_times.append(time.perf_counter() - t0)
        steps += 1
        while marks and consumed >= marks[0]:
            losses[f"{marks[0] / budget:.2f}"] = trainer.val_loss(val, args.batch)
            marks.pop(0)
    log(
        f"{arm} seed {seed}: {steps} steps, {consumed} tokens, val loss {losses.get('1.00', float('nan')):.4f}, "
        f"{1000 * statistics.mean(step_times):.0f} ms/step"
    )
    return {"steps": steps, "tokens": consumed, "val_loss": losses, "step_s": step_times}


def pick_trainer(requested: str, args) -> tuple[str, str]:
    if requested == "torch":
        return "torch", "requested"
    try:
        t = Trainer("ds_train", make_model(args, 0), ds_config(args, "random_ltd", 0), args)
        t.train_step(torch.zeros(args.batch, args.seqlen, dtype=torch.int64))
        return "ds_train", "ds_train.initialize"
    except Exception as exc:  # the engine is optional here; say why it was not used
        if requested == "ds_train":
            raise
        return "torch", f"ds_train.initialize failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def bench_analyzer(args) -> None:
    import tempfile
    import tracemalloc

    from ds_data.analyzer import build_index

    with tempfile.TemporaryDirectory() as tmp:
        n = args.analyzer_samples
        values = np.lib.format.open_memmap(f"{tmp}/values.npy", mode="w+", dtype=np.int64, shape=(n,))
        values[:] = np.random.default_rng(0).integers(0, 4096, size=n)
        values.flush()
        cap = int(args.analyzer_cap_mb * 2**20)
        res = {}
        for name, limit in (("capped", cap), ("in_memory", None)):
            tracemalloc.start()
            t0 = time.perf_counter()
            stats = build_index(values, f"{tmp}/{name}", name, memory_limit_bytes=limit)
            res[name] = {
                "peak_bytes": tracemalloc.get_traced_memory()[1],
                "seconds": round(time.perf_counter() - t0, 3),
                "sort_runs": stats["runs"],
            }
            tracemalloc.stop()
            log(f"analyzer index {name}: {res[name]}")
        same = all(
            np.array_equal(
                np.load(f"{tmp}/capped/{f}", mmap_mode="r"), np.load(f"{tmp}/in_memory/{f}", mmap_mode="r")
            )
            for f in (
                "sample_to_metric.npy",
                "index_to_sample.npy",
                "index_to_metric.npy",
                "index_offsets.npy",
            )
        )
    print(
        json.dumps(
            {
                "bench": "data_analyzer_index_memory",
                "samples": n,
                "data_bytes": n * 16,
                "cap_bytes": cap,
                "capped": res["capped"],
                "in_memory": res["in_memory"],
                "identical_files": same,
                "ratio_peak_capped_vs_in_memory": round(
                    res["capped"]["peak_bytes"] / res["in_memory"]["peak_bytes"], 4
                ),
                "ratio_time_capped_vs_in_memory": round(
                    res["capped"]["seconds"] / res["in_memory"]["seconds"], 3
                ),
            }
        )
    )


def bench_ltd_speed(args) -> None:
    import transformers
    from ds_data.random_ltd import RandomLTDState, convert_to_random_ltd

    transformers.logging.set_verbosity_error()
    layers, hidden, seqlen = args.speed_layers, args.speed_hidden, args.speed_seqlen
    keep = int(seqlen * args.speed_keep)
    models = {}
    for arm in ("baseline", "random_ltd"):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            n_layer=layers,
            n_embd=hidden,
            n_head=max(1, hidden // 64),
            vocab_size=8192,
            n_positions=seqlen,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        )
        model = transformers.GPT2LMHeadModel(cfg).train()
        if arm == "random_ltd":
            convert_to_random_ltd(model, list(range(1, layers - 1)), layers, RandomLTDState(keep))
        models[arm] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    ids = torch.randint(0, 8192, (args.batch, seqlen))
    times = {arm: [] for arm in models}
    for _ in range(args.speed_reps + 1):  # the first round warms up
        for arm, (model, opt) in models.items():
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[arm].append(time.perf_counter() - t0)
    ms = {arm: round(1000 * statistics.median(t[1:]), 1) for arm, t in times.items()}
    log(f"ltd_speed: {ms}")
    print(
        json.dumps(
            {
                "bench": "random_ltd_step_time",
                "model": f"GPT-2 {layers}L/{hidden}H, vocab 8192",
                "batch": args.batch,
                "seqlen": seqlen,
                "ltd_layers": layers - 2,
                "kept_tokens": keep,
                "threads": args.threads,
                "ms_per_step_baseline": ms["baseline"],
                "ms_per_step_random_ltd": ms["random_ltd"],
                "ratio_ms_per_step_random_ltd_vs_baseline": round(ms["random_ltd"] / ms["baseline"], 3),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=250, help="baseline optimizer steps (sets the token budget)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--curriculum-min", type=int, default=16)
    p.add_argument("--curriculum-frac", type=float, default=0.4, help="curriculum length / baseline steps")
    p.add_argument("--ltd-min", type=int, default=32)
    p.add_argument("--ltd-frac", type=float, default=0.7, help="random-LTD schedule length / baseline steps")
    p.add_argument("--val-seqs", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is fastest on a shared, oversubscribed machine",
    )
    p.add_argument("--arms", default="baseline,seqlen_curriculum,random_ltd")
    p.add_argument("--trainer", choices=["auto", "ds_train", "torch"], default="auto")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "ds_bench"))
    p.add_argument("--mode", choices=["train", "ltd_speed", "analyzer"], default="train")
    p.add_argument("--speed-layers", type=int, default=8)
    p.add_argument("--speed-hidden", type=int, default=256)
    p.add_argument("--speed-seqlen", type=int, default=256)
    p.add_argument(
        "--speed-keep", type=float, default=0.5, help="kept fraction of tokens in the middle layers"
    )
    p.add_argument("--speed-reps", type=int, default=10)
    p.add_argument("--analyzer-samples", type=int, default=4_000_000)
    p.add_argument("--analyzer-cap-mb", type=float, default=8.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode == "analyzer":
        bench_analyzer(args)
        return
    if args.mode == "ltd_speed":
        bench_ltd_speed(args)
        return
    arms = args.arms.split(",")
    train = tokenize(ROOT / "data" / "corpus" / "python_docs_train.txt", Path(args.cache_dir))
    val_ids = tokenize(ROOT / "data" / "corpus" / "python_docs_valid.txt", Path(args.cache_dir))
    stride = (val_ids.shape[0] - args.seqlen) // args.val_seqs
    val = torch.from_numpy(
        np.stack([val_ids[i * stride : i * stride + args.seqlen] for i in range(args.val_seqs)]).astype(
            np.int64
        )
    )
    kind, why = pick_trainer(args.trainer, args)
    log(f"trainer: {kind} ({why}); {len(train)} train tokens, {val.numel()} validation tokens")
    results = {arm: [] for arm in arms}
    for seed in range(args.seeds):
        for arm in arms:
            results[arm].append(run_arm(args, arm, 1000 + seed, train, val, kind))

    summary = {}
    for arm, runs in results.items():
        keys = [k for k in runs[0]["val_loss"] if all(k in r["val_loss"] for r in runs)]
        all_steps = [t for r in runs for t in r["step_s"]]
        summary[arm] = {
            "val_loss_mean": {k: round(statistics.mean(r["val_loss"][k] for r in runs), 4) for k in keys},
            "val_loss_std": {k: round(statistics.pstdev([r["val_loss"][k] for r in runs]), 4) for k in keys},
            "steps_to_budget": statistics.mean(r["steps"] for r in runs),
            "ms_per_step_median": round(1000 * statistics.median(all_steps), 2),
            "train_s_to_budget": round(statistics.mean(sum(r["step_s"]) for r in runs), 2),
        }
    out = {
        "bench": "data_efficiency",
        "trainer": kind,
        "trainer_note": why,
        "model": f"GPT-2 {args.layers}L/{args.hidden}H/{args.heads}heads, vocab 8192, seqlen {args.seqlen}",
        "batch": args.batch,
        "token_budget": args.steps * args.batch * args.seqlen,
        "seeds": args.seeds,
        "threads": args.threads,
        "arms": summary,
    }
    if "baseline" in summary:
        base = summary["baseline"]
        for arm in arms:
            if arm == "baseline":
                continue
            s = summary[arm]
            out[f"ratio_val_loss_{arm}_vs_baseline"] = round(
                s["val_loss_mean"]["1.00"] / base["val_loss_mean"]["1.00"], 4
            )
            out[f"ratio_ms_per_step_{arm}_vs_baseline"] = round(
                s["ms_per_step_median"] / base["ms_per_step_median"], 3
            )
            out[f"ratio_train_time_{arm}_vs_baseline"] = round(
                s["train_s_to_budget"] / base["train_s_to_budget"], 3
            )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
