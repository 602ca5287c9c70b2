"""Communication volume per optimizer step, from ds_core.comm's comms logger, against ZeRO theory.

Every collective is converted to the elements a bandwidth-optimal (ring) algorithm moves per rank:
all-reduce of n elements = 2n(N-1)/N, reduce-scatter and all-gather of n elements (whole buffer)
= n(N-1)/N each. Theory per rank per step, stages 0, 1 and 2 alike: 2 Psi (N-1)/N (an all-reduce,
or a reduce-scatter of the gradients plus an all-gather of the parameters). DDP's all-reduce is the
baseline; it moves the same 2 Psi (N-1)/N. Prints one JSON line per (stage, N, collectives):

- "native": reduce_scatter and allgather_partitions set true (DeepSpeed's collectives), which the theory
  describes; this is the line to hold against the 5% target;
- "default": both unset, so on gloo the engine reduce-scatters each gradient bucket by point-to-point
  sends (each rank sends the N-1 pieces it does not own: n(N-1)/N, like a ring reduce-scatter) and
  gathers with one broadcast per rank (ds_core.comm.prefers_point_to_point: faster there).

    .venv/bin/python tools/bench/bench_zero_comm.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zero_common import batch, ds_config, gpt  # noqa: E402

_RING = {
    "all_reduce": lambda n, w: 2 * n * (w - 1) / w,
    "reduce_scatter_tensor": lambda n, w: n * (w - 1) / w,
    "reduce_scatter": lambda n, w: n * (w - 1) / w,
    "reduce_scatter_by_sends": lambda n, w: n * (w - 1) / w,  # n: the whole bucket, as for the collective
    "all_gather_into_tensor": lambda n, w: n * (w - 1) / w,
    "all_gather": lambda n, w: n * (w - 1) / w,
    "broadcast": lambda n, w: n * (w - 1) / w,  # each non-root receives n: averaged over the ranks
}


def _measure(stage: int, collectives: str) -> dict:
    import ds_train
    from ds_core import comm

    model = gpt()
    psi = sum(p.numel() for p in model.parameters())
    cfg = ds_config(stage, "bf16", bucket=2_000_000)
    if collectives == "native":
        cfg["zero_optimization"].update(reduce_scatter=True, allgather_partitions=True)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    world = comm.get_world_size()
    ids = batch(0, comm.get_rank())
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()  # warm-up step: optimizer state allocation
    comm.comms_logger.configure(enabled=True)
    comm.comms_logger.reset()
    ids = batch(1, comm.get_rank())
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    totals = comm.comms_logger.totals()
    comm.comms_logger.configure(enabled=False)
    elements = 0.0
    for op, rec in totals.items():
        if op not in _RING:
            raise RuntimeError(f"unexpected collective {op} in a ZeRO step")
        # bf16 buffers except the tiny fp32 norm/overflow reductions: count every byte as 2-byte elements
        elements += _RING[op](rec["bytes"] / 2, world)
    return {
        "psi": psi,
        "world": world,
        "ring_elements": elements,
        "ops": {op: {"count": rec["count"], "bytes": rec["bytes"]} for op, rec in totals.items()},
    }


def main() -> None:
    from ds_core.testing import run_distributed

    for world in (2, 4):
        for stage, collectives in [(0, "default")] + [(s, c) for s in (1, 2) for c in ("native", "default")]:
            res = run_distributed(_measure, world, stage, collectives)[0]
            theory = 2 * res["psi"] * (world - 1) / world
            print(
                json.dumps(
                    {
                        "bench": "zero_comm",
                        "stage": stage,
                        "world": world,
                        "collectives": collectives,
                        "psi": res["psi"],
                        "measured_elements_per_rank": int(res["ring_elements"]),
                        "theory_elements_per_rank": int(theory),
                        "ddp_allreduce_elements_per_rank": int(theory),
                        "ratio": round(res["ring_elements"] / theory, 4),
                        "ops": res["ops"],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
