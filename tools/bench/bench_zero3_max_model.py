"""Largest GPT-2 that trains under a per-process memory cap: ZeRO-3 (+CPU / +NVMe offload) vs FSDP2 and stage 2.

For each method, 2 steps of bf16 AdamW training (seq 64, micro batch 1) run on 2 gloo ranks, each rank a
fresh process started for that probe. The cap is enforced on the whole process (interpreter, torch and
all): the parent polls every rank's VmRSS (/proc/<pid>/status) every 20 ms and kills the probe as soon as
one rank is over the cap, and each rank reports its VmHWM (peak resident set) at the end; a peak over the
cap is a failure even if the poll missed it. RLIMIT_AS is not used (torch and glibc reserve far more
address space than they touch) and neither is RLIMIT_DATA (it also counts untouched reservations).
There is no swap on the bench machine, so RSS is all the memory a process holds.

Search: GPT-2 configs from an n_layer x n_embd grid, sorted by parameter count; double the parameter
count from ~cap/64 parameters until a probe fails, then bisect between the last success and the first
failure until they are within --resolution (10%) of each other.
Memory is assumed monotone in the parameter count along that list. A probe that runs out of time is
neither a success nor a failure: the search for that method stops and its result is a lower bound
(`time_limited`). The time limit is shared: each method gets an equal part of what is left.

Methods: ours (ds-train) at stage 3 with params and optimizer offloaded to NVMe (swap files in a temp
folder), stage 3 with CPU offload, stage 3 plain (all three build the model under `ds_train.zero.Init`,
the DeepSpeed recipe for large models), stage 2 (model built whole, then handed to the engine), and FSDP2
(`fully_shard` per block and root, MixedPrecisionPolicy bf16 params and reductions, fp32 sharded params,
torch AdamW; the model is built whole on each rank and then sharded, FSDP2's eager recipe).

    .venv/bin/python tools/bench/bench_zero3_max_model.py [--cap-gib 1] [--max-seconds 600]
    .venv/bin/python tools/bench/bench_zero3_max_model.py --cap-gib 4 --max-seconds 1200 --resolution 0.2 --warm-start
The second line is the issue's 4 GiB cap (2 ranks x 4 GiB: needs ~9 GiB free); probes take longer there
(bigger models), so the coarser bisection keeps it near 20 minutes on 2 cores, and the NVMe search,
which runs last, usually ends time-limited (its result is then a lower bound).
Prints progress on stderr and one JSON line on stdout: the largest parameter count per method and the
ratios ours (ZeRO-3 + NVMe) / FSDP2 and ours / stage 2 (> 1: ours trains a larger model in the same cap).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

VOCAB = 8192
SEQ = 64
WORLD = 2
METHODS = ("zero2", "fsdp2", "zero3", "zero3_cpu", "zero3_nvme")  # cheap first: leftover time goes to NVMe
EMBDS = (128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 4096)
LAYERS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48)


def gpt2_params(n_embd: int, n_layer: int) -> int:
    """Parameters of GPT2LMHeadModel (lm_head tied to wte): embeddings + blocks + final LayerNorm."""
    block = 12 * n_embd * n_embd + 13 * n_embd
    return (VOCAB + SEQ) * n_embd + n_layer * block + 2 * n_embd


def size_ladder() -> list[tuple[int, int, int]]:
    """(params, n_embd, n_layer) over the grid, ascending, keeping sizes at least 3% apart."""
    grid = sorted((gpt2_params(e, n), e, n) for e in EMBDS for n in LAYERS)
    ladder: list[tuple[int, int, int]] = []
    for entry in grid:
        if not ladder or entry[0] >= ladder[-1][0] * 1.03:
            ladder.append(entry)
    return ladder


# ---------------------------------------------------------------------------------------------- rank side
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _gpt_config(n_embd: int, n_layer: int):  # -> transformers.GPT2Config
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=n_embd, n_layer=n_layer, n_head=8,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def _ds_config(method: str, nvme_dir: str, n_embd: int) -> dict:
    zero: dict = {"stage": 2 if method == "zero2" else 3}
    if method == "zero2":
        # gloo's all-reduce/broadcast beat its reduce-scatter/all-gather (see ds-train README); buckets
        # kept small so that they are not what decides the largest model
        zero.update({"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000})
    else:
        zero.update({"reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000,
                     "stage3_max_live_parameters": 20_000_000, "stage3_param_persistence_threshold": 10_000})
    if method == "zero3_cpu":
        zero["offload_param"] = {"device": "cpu"}
        zero["offload_optimizer"] = {"device": "cpu"}
    elif method == "zero3_nvme":
        largest_shard = math.ceil(max(VOCAB * n_embd, 4 * n_embd * n_embd) / WORLD)
        zero["sub_group_size"] = 1 << 20
        zero["offload_param"] = {"device": "nvme", "nvme_path": nvme_dir, "buffer_size": largest_shard}
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_dir, "buffer_count": 2}
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 0,
           "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
           "zero_optimization": zero}
    if method == "zero3_nvme":
        cfg["aio"] = {"block_size": 1 << 20, "queue_depth": 16, "intra_op_parallelism": 1}
    return cfg


def _train_ours(method: str, n_embd: int, n_layer: int, nvme_dir: str, rank: int) -> tuple[int, list[float]]:
    import ds_train
    import torch
    import transformers

    cfg = _ds_config(method, nvme_dir, n_embd)
    torch.manual_seed(0)
    if method == "zero2":
        model = transformers.GPT2LMHeadModel(_gpt_config(n_embd, n_layer))
        params = sum(p.numel() for p in model.parameters())
    else:
        with ds_train.zero.Init(config_dict_or_path=cfg):
            model = transformers.GPT2LMHeadModel(_gpt_config(n_embd, n_layer))
        params = sum(p.ds3.numel for p in model.parameters())
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    losses = []
    for step in range(2):
        ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(step * 10 + rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    engine.destroy()
    return params, losses


def _train_fsdp2(n_embd: int, n_layer: int, rank: int) -> tuple[int, list[float]]:
    import torch
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt_config(n_embd, n_layer))
    params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (WORLD,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    losses = []
    for step in range(2):
        ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(step * 10 + rank))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return params, losses


def rank_main(method: str, n_embd: int, n_layer: int, nvme_dir: str) -> None:
    """One rank of one probe: train 2 steps, print a RESULT line with the peak RSS."""
    import torch
    from ds_core import comm

    torch.set_num_threads(1)
    comm.init_distributed(dist_backend="gloo")
    rank = comm.get_rank()
    if method == "fsdp2":
        params, losses = _train_fsdp2(n_embd, n_layer, rank)
    else:
        rank_dir = os.path.join(nvme_dir, f"rank{rank}")
        os.makedirs(rank_dir, exist_ok=True)
        params, losses = _train_ours(method, n_embd, n_layer, rank_dir, rank)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss {losses}")
    comm.barrier()
    print("RESULT " + json.dumps({"rank": rank, "params": params, "losses": losses,
                                  "peak_rss": _status_bytes("VmHWM:")}), flush=True)
    comm.destroy_process_group()


# -------------------------------------------------------------------------------------------- parent side
def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def probe(method: str, n_embd: int, n_layer: int, cap: int, timeout: float) -> dict:
    """Run one probe on WORLD fresh processes; verdict is "ok", "over_cap", "error" or "timeout"."""
    from ds_core.comm import free_port

    nvme_dir = tempfile.mkdtemp(prefix="ds_maxmodel_", dir="/var/tmp")
    port = free_port()
    procs, logs = [], []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--rank-worker", method, str(n_embd), str(n_layer), nvme_dir]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        logs.append(log)
    start, verdict, worst = time.monotonic(), None, 0
    try:
        while any(p.poll() is None for p in procs):
            rss = max(_rss_of(p.pid) for p in procs)
            worst = max(worst, rss)
            if rss > cap:
                verdict = "over_cap"
                break
            if time.monotonic() - start > timeout:
                verdict = "timeout"
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        shutil.rmtree(nvme_dir, ignore_errors=True)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    results = [json.loads(line[len("RESULT "):]) for out in outputs for line in out.splitlines()
               if line.startswith("RESULT ")]
    peak = max([worst] + [r["peak_rss"] for r in results])
    if verdict is None:
        if any(p.returncode != 0 for p in procs) or len(results) != WORLD:
            verdict = "error"
        else:
            verdict = "ok" if peak <= cap else "over_cap"
    tail = "" if verdict in ("ok", "over_cap", "timeout") else outputs[0][-600:] + outputs[-1][-600:]
    return {"verdict": verdict, "peak_rss": peak, "seconds": time.monotonic() - start,
            "params": results[0]["params"] if results else None, "tail": tail}


def search(method: str, cap: int, deadline: float, ladder: list[tuple[int, int, int]], start: int,
           resolution: float) -> dict:
    """Doubling from ladder[start], then bisection until the last success and the first failure are within
    `resolution` of each other; returns the largest size that trained under the cap."""
    def run(i: int) -> str:
        remaining = deadline - time.monotonic()
        if remaining < 5:
            return "timeout"
        psi, embd, layers = ladder[i]
        r = probe(method, embd, layers, cap, remaining)
        print(f"[{method}] n_embd={embd} n_layer={layers} params={psi / 1e6:.1f}M -> {r['verdict']} "
              f"peak {r['peak_rss'] / 2**20:.0f} MiB in {r['seconds']:.1f}s", file=sys.stderr, flush=True)
        if r["verdict"] == "ok" and r["params"] != psi:
            raise RuntimeError(f"parameter count {r['params']} differs from the formula {psi}")
        if r["verdict"] == "error":
            print(r["tail"], file=sys.stderr, flush=True)
        results[i] = r
        return r["verdict"]

    results: dict[int, dict] = {}
    good, bad, time_limited = -1, len(ladder), False
    i = start
    while i < len(ladder):  # doubling (a failure at the start size leaves bisection from the smallest)
        v = run(i)
        if v == "timeout":
            time_limited = True
            break
        if v != "ok":
            bad = i
            break
        good = i
        target = 2 * ladder[i][0]
        last = len(ladder) - 1
        i = next((j for j in range(i + 1, len(ladder)) if ladder[j][0] >= target), last if i < last else len(ladder))
    def wide() -> bool:
        return bad - good > 1 and (good < 0 or ladder[bad][0] > (1 + resolution) * ladder[good][0])

    while not time_limited and bad < len(ladder) and wide():  # bisection
        mid = (good + bad) // 2
        v = run(mid)
        if v == "timeout":
            time_limited = True
        elif v == "ok":
            good = mid
        else:
            bad = mid
    out = {"max_params": ladder[good][0] if good >= 0 else 0, "time_limited": time_limited,
           "grid_exhausted": bad >= len(ladder) and not time_limited, "probes": len(results)}
    if good >= 0:
        out.update(n_embd=ladder[good][1], n_layer=ladder[good][2],
                   peak_rss_mib=round(results[good]["peak_rss"] / 2**20, 1))
    if bad < len(ladder):
        fail = results[bad]
        out.update(first_fail_params=ladder[bad][0], first_fail=fail["verdict"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cap-gib", type=float, default=1.0, help="per-process peak RSS cap (GiB)")
    ap.add_argument("--max-seconds", type=float, default=600.0, help="total time limit for all searches")
    ap.add_argument("--resolution", type=float, default=0.1,
                    help="stop bisecting when the first failure is within this fraction above the last success")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--warm-start", action="store_true",
                    help="start each method's search at the largest size an earlier method trained (saves the "
                         "small probes at big caps; a failure there still bisects downwards)")
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if a.cap_gib <= 0 or a.max_seconds <= 0 or a.resolution <= 0:
        ap.error("--cap-gib, --max-seconds and --resolution must be positive")
    cap = int(a.cap_gib * 2**30)
    ladder = size_ladder()
    # start near 1 parameter per 64 bytes of cap (all methods pass there at 1 GiB), not at the smallest
    # size: every probe pays ~5 s of process start-up, and a failure there still bisects downwards
    start = next((i for i, e in enumerate(ladder) if e[0] >= cap / 64), len(ladder) - 1)
    end = time.monotonic() + a.max_seconds
    load_before = os.getloadavg()[0]
    found: dict[str, dict] = {}
    for k, method in enumerate(methods):
        share = (end - time.monotonic()) / (len(methods) - k)
        first = start
        if a.warm_start:
            done = [ladder.index((r["max_params"], r["n_embd"], r["n_layer"])) for r in found.values()
                    if r["max_params"]]
            first = max([start] + done)
        found[method] = search(method, cap, time.monotonic() + share, ladder, first, a.resolution)

    def ratio(num: str, den: str) -> float | None:
        if num not in found or den not in found or not found[den]["max_params"]:
            return None
        return round(found[num]["max_params"] / found[den]["max_params"], 3)

    print(json.dumps({
        "bench": "zero3_max_model", "cap_gib_per_process": a.cap_gib, "cap_check": "peak RSS (VmRSS poll + VmHWM)",
        "world": WORLD, "seq": SEQ, "micro_batch": 1, "steps": 2, "precision": "bf16, AdamW",
        "max_seconds": a.max_seconds, "resolution": a.resolution, "warm_start": a.warm_start,
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # start, end: 2 cores here
        "max_params": {m: r["max_params"] for m, r in found.items()},
        "ratio_zero3_nvme_over_fsdp2": ratio("zero3_nvme", "fsdp2"),
        "ratio_zero3_nvme_over_zero2": ratio("zero3_nvme", "zero2"),
        "ratio_zero3_over_fsdp2": ratio("zero3", "fsdp2"),
        "ratio_zero3_cpu_over_fsdp2": ratio("zero3_cpu", "fsdp2"),
        "details": found,
    }))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--rank-worker":
        rank_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
