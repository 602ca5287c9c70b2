"""ZeRO-3 per-rank model-state memory vs 16Ψ/N and communication per step vs 3Ψ (ours, counted, same run).

GPT-2 (~20M parameters, transformers from a config) in bf16 with AdamW on 2 gloo ranks, nothing
persistent. Memory: bytes of every tensor the strategy holds (fp32 master, bf16 shards unless they are
the master itself, bf16 gradient shard, Adam moments; each storage counted once) against DeepSpeed's
formula 16Ψ/N and against ours, 14Ψ/N (the gathers cast the master instead of keeping a bf16 copy).
Communication: elements moved by the all-gathers and reduce-scatters of one training step
(ds_core.comm.comms_logger, after a warmup step that records the module order) against 3Ψ (forward
gather, backward gather, reduce-scatter), measured with the native collectives set explicitly
(`reduce_scatter: true`, `allgather_partitions: true`): on gloo the unset default substitutes a
reduce-scatter of each gradient bucket by point-to-point sends and one broadcast per rank's piece of a
gather (ds_core.comm.prefers_point_to_point). A second run with that default reports the elements handed
to its collectives (`substitute_*`); they put the same (N-1)/N of each buffer on the wire per rank as the
native ones, without gloo's whole-size temporaries (tools/bench/bench_gloo_collectives.py).

    .venv/bin/python tools/bench/bench_zero3_memory_comm.py [--world 2] [--layers 5]
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json

import torch

VOCAB = 8192


def _gpt(n_embd: int, n_layer: int, seq: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=seq, n_embd=n_embd, n_layer=n_layer, n_head=8,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _worker(n_embd: int, n_layer: int, seq: int, micro: int, native: bool) -> dict:
    import ds_train
    from ds_core import comm

    world, rank = comm.get_world_size(), comm.get_rank()
    model = _gpt(n_embd, n_layer, seq)
    psi = sum(p.numel() for p in model.parameters())  # unique parameters (the tied head counted once)
    cfg = {
        "train_micro_batch_size_per_gpu": micro, "steps_per_print": 0, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": 5_000_000, "stage3_prefetch_bucket_size": 5_000_000},
    }
    if native:  # the collectives the 3Ψ theory counts, whatever the backend would pick
        cfg["zero_optimization"].update(reduce_scatter=True, allgather_partitions=True)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    s = engine.strategy

    def step(i: int) -> None:
        ids = torch.randint(0, VOCAB, (micro, seq), generator=torch.Generator().manual_seed(i * 10 + rank))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    step(0)  # records the module order
    comm.comms_logger.configure(enabled=True)
    comm.comms_logger.reset()
    step(1)
    totals = comm.comms_logger.totals()
    comm.comms_logger.configure(enabled=False)
    ops = ("all_gather_into_tensor" if s.allgather_partitions else "broadcast",
           {"reduce_scatter": "reduce_scatter_tensor", "sends": "reduce_scatter_by_sends",
            "all_reduce": "all_reduce"}[s.reduce])
    moved = {op: t["bytes"] // 2 for op, t in totals.items() if op in ops}  # bf16: 2 bytes per element
    collectives = (s.reduce, s.allgather_partitions)
    seen: set[int] = set()

    def count(tensors) -> int:  # each storage once: the shards may be the master itself (MasterTier)
        total = 0
        for t in tensors:
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    held = {
        "fp32_master": count(s.master),
        "bf16_shards": count(getattr(s.tier, "flats", [])),
        "grad_shards": count(s.grad_shards),
        "optimizer_state": count(v for st in s.optimizer.state.values()
                                 for v in st.values() if isinstance(v, torch.Tensor) and v.numel() > 1),
    }
    engine.destroy()
    return {"psi": psi, "world": world, "held": held, "moved": moved, "collectives": collectives}


def main() -> None:
    from ds_core.testing import run_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--embd", type=int, default=512)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2)
    a = ap.parse_args()
    res = run_distributed(_worker, a.world, a.embd, a.layers, a.seq, a.micro, True, timeout=900)[0]
    sub = run_distributed(_worker, a.world, a.embd, a.layers, a.seq, a.micro, False, timeout=900)[0]
    if res["collectives"] != ("reduce_scatter", True):
        raise RuntimeError(f"the native collectives were asked for, the strategy used {res['collectives']}")
    psi, world = res["psi"], res["world"]
    held = sum(res["held"].values())
    formula = 16 * psi / world
    moved = sum(res["moved"].values())
    print(json.dumps({
        "bench": "zero3_memory_comm", "model": f"gpt2 {psi / 1e6:.1f}M params, bf16, AdamW", "world": world,
        "model_state_bytes_per_rank": held, "formula_16psi_over_n": formula,
        "memory_ratio": round(held / formula, 4), "formula_ours_14psi_over_n": 14 * psi / world,
        "memory_ratio_vs_14psi": round(held / (14 * psi / world), 4), "held_breakdown": res["held"],
        "elements_moved_per_step": moved, "theory_3psi": 3 * psi, "comm_ratio": round(moved / (3 * psi), 4),
        "moved_breakdown": res["moved"], "collectives": "native: reduce_scatter=true, allgather_partitions=true",
        "substitute_collectives": "unset (this backend: " + ("native" if sub["collectives"] == ("reduce_scatter", True)
                                                              else f"{sub['collectives'][0]} + broadcasts") + ")",
        "substitute_elements_per_step": sum(sub["moved"].values()),
        "substitute_ratio_vs_3psi": round(sum(sub["moved"].values()) / (3 * psi), 4),
        "substitute_breakdown": sub["moved"],
    }))


if __name__ == "__main__":
    main()
