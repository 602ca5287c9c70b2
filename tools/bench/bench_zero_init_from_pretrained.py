"""transformers' `from_pretrained` under ZeRO-3 `zero.Init`: per-rank memory and time, ours vs DeepSpeed 0.19.8.

One GPT-2 checkpoint (sharded safetensors, fp32) is loaded on 2 gloo ranks, each rank a fresh process:
  ours       `with ds_train.zero.Init(config=cfg): AutoModelForCausalLM.from_pretrained(dir)`
  deepspeed  `HfDeepSpeedConfig(cfg)` then `AutoModelForCausalLM.from_pretrained(dir)` (transformers' own
             ZeRO-3 path: deepspeed.zero.Init, then rank 0 reads the state dict and scatters it), run by the
             interpreter of a venv with deepspeed (--deepspeed-python)
  plain      `AutoModelForCausalLM.from_pretrained(dir)` on every rank, then every weight read once (what a
             replicated model costs as soon as it is used)
Each rank samples its anonymous (private) and file-backed resident set every millisecond from just before
the call (the model's code is imported before, so import costs are not counted) and reports the peak
growth of each; file-backed pages are the checkpoint's memory-mapped page cache, shared by the ranks of a
node. After the measurement every rank gathers the weights one at a time and rank 0 compares them with the
checkpoint files bit for bit (`exact`).

    .venv/bin/python tools/bench/bench_zero_init_from_pretrained.py [--embd 1024 --layers 12]
        [--rounds 2] [--deepspeed-python /tmp/dsbench3/bin/python]
One JSON line on stdout: per method the peak growth (max over ranks, median over rounds) and the ratios
ours / deepspeed (< 1: ours holds less / loads faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

VOCAB = 8192
WORLD = 2
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10**9, "zero_optimization": {"stage": 3}}


# ---------------------------------------------------------------------------------------------- rank side
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class _Peaks:
    """Peak growth of RssAnon and RssFile, sampled every millisecond on a thread."""

    def __enter__(self) -> _Peaks:
        self.start = {k: _status(k) for k in ("RssAnon:", "RssFile:")}
        self.peak = dict(self.start)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for k in self.peak:
            self.peak[k] = max(self.peak[k], _status(k))

    def _run(self) -> None:
        while not self._stop:
            self._sample()
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self._sample()

    def growth(self, field: str) -> int:
        return self.peak[field] - self.start[field]


def _checkpoint_tensors(path: str):
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def rank_main(method: str, path: str) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    if method == "deepspeed":
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        deepspeed.init_distributed(dist_backend="gloo")
        rank = torch.distributed.get_rank()  # a DeepSpeed venv: our ds_core is not installed there
        gathered = deepspeed.zero.GatheredParameters
        keep = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841 (transformers holds a weak reference)
    else:
        import ds_train
        from ds_core import comm

        comm.init_distributed(dist_backend="gloo")
        rank = comm.get_rank()
        gathered = ds_train.zero.GatheredParameters
    _ = transformers.GPT2LMHeadModel  # import the model's code before measuring
    start = time.perf_counter()
    with _Peaks() as peaks:
        if method == "ours":
            with ds_train.zero.Init(config=DS_CONFIG):
                model = transformers.AutoModelForCausalLM.from_pretrained(path)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
            if method == "plain":
                for p in model.parameters():
                    p.detach().sum()
    seconds = time.perf_counter() - start
    params = dict(model.named_parameters())
    exact = True
    for key, want in _checkpoint_tensors(path) if rank == 0 else ():
        p = params.get(key)
        if p is None:
            continue  # the tied head: its key is not in the checkpoint
        with gathered([p], enabled=method != "plain"):
            exact = exact and torch.equal(p.detach(), want)
    if rank != 0:  # the other ranks join the same gathers, in the same order
        for key in [k for k, _ in _checkpoint_tensors(path)]:
            p = params.get(key)
            if p is not None:
                with gathered([p], enabled=method != "plain"):
                    pass
    print("RESULT " + json.dumps({"rank": rank, "seconds": seconds, "anon": peaks.growth("RssAnon:"),
                                  "file": peaks.growth("RssFile:"), "exact": exact if rank == 0 else None}),
          flush=True)


# -------------------------------------------------------------------------------------------- parent side
def _run(method: str, python: str, path: str, port: int) -> dict:
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "DS_ACCELERATOR": "cpu"}
        cmd = [python, os.path.abspath(__file__), "--rank-worker", method, path]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    results = [json.loads(line[len("RESULT "):]) for out in outs for line in out.splitlines()
               if line.startswith("RESULT ")]
    if any(p.returncode != 0 for p in procs) or len(results) != WORLD:
        sys.stderr.write("\n".join(out[-3000:] for out in outs))
        raise RuntimeError(f"{method}: a rank failed; its output is above")
    return {"seconds": max(r["seconds"] for r in results), "anon": max(r["anon"] for r in results),
            "file": max(r["file"] for r in results), "exact": next(r["exact"] for r in results if r["rank"] == 0)}


def main() -> None:
    import torch
    import transformers
    from ds_core.comm import free_port

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shard-mb", type=int, default=200, help="max_shard_size of the checkpoint (MB)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are reported")
    ap.add_argument("--deepspeed-python", default=None, help="python of a venv with deepspeed and transformers")
    a = ap.parse_args()
    transformers.logging.set_verbosity_error()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir="/var/tmp") as path:
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=a.embd, n_layer=a.layers, n_head=16)
        model = transformers.GPT2LMHeadModel(cfg)
        full = sum(p.numel() for p in model.parameters()) * 4
        model.save_pretrained(path, max_shard_size=f"{a.shard_mb}MB")
        del model
        methods = {"plain": sys.executable, "ours": sys.executable}
        if a.deepspeed_python:
            methods["deepspeed"] = a.deepspeed_python
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for _ in range(a.rounds):
            for method, python in methods.items():
                runs[method].append(_run(method, python, path, free_port()))
                print(f"[{method}] {runs[method][-1]}", file=sys.stderr, flush=True)

    def summary(rs: list[dict]) -> dict:
        return {"anon_peak_mib": round(statistics.median(r["anon"] for r in rs) / 2**20, 1),
                "file_peak_mib": round(statistics.median(r["file"] for r in rs) / 2**20, 1),
                "seconds": round(statistics.median(r["seconds"] for r in rs), 2),
                "exact": all(r["exact"] for r in rs)}

    out = {m: summary(rs) for m, rs in runs.items()}
    res = {"bench": "zero_init_from_pretrained", "world": WORLD, "model_fp32_mib": round(full / 2**20, 1),
           "checkpoint_shard_mb": a.shard_mb, "rounds": a.rounds,
           "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], **out,
           "ours_anon_over_model": round(out["ours"]["anon_peak_mib"] * 2**20 / full, 3)}
    if "deepspeed" in out:
        ds = out["deepspeed"]
        res["anon_ratio_ours_over_deepspeed"] = round(out["ours"]["anon_peak_mib"] / max(ds["anon_peak_mib"], 0.1), 3)
        res["rss_ratio_ours_over_deepspeed"] = round(
            (out["ours"]["anon_peak_mib"] + out["ours"]["file_peak_mib"])
            / max(ds["anon_peak_mib"] + ds["file_peak_mib"], 0.1), 3)
        res["time_ratio_ours_over_deepspeed"] = round(out["ours"]["seconds"] / ds["seconds"], 3)
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--rank-worker":
        rank_main(sys.argv[2], sys.argv[3])
    else:
        main()
