"""Per-rank memory of model states for ZeRO stages 0/1/2 against the ZeRO paper's formulas.

Mixed-precision Adam (bf16 params and grads, fp32 master + Adam m, v), Psi parameters, N ranks:
    stage 0: 2Psi + 2Psi + 12Psi      stage 1: 2Psi + 2Psi + 12Psi/N      stage 2: 2Psi + (2Psi + 12Psi)/N
Counted from the tensors the engine actually holds after one step (distinct storages, padding
included). Prints one JSON line per (stage, N) with measured/formula.

    .venv/bin/python tools/bench/bench_zero_memory.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_zero_common import batch, ds_config, gpt  # noqa: E402


def _measure(stage: int) -> dict:
    import ds_train
    from ds_core import comm
    from ds_core.utils import tensor_bytes

    model = gpt()
    psi = sum(p.numel() for p in model.parameters())
    engine, *_ = ds_train.initialize(model=model, config=ds_config(stage, "bf16", bucket=2_000_000))
    ids = batch(0, comm.get_rank())
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    held = engine.strategy.model_state_tensors()
    counted = {kind: tensor_bytes(ts) for kind, ts in held.items()}
    return {"psi": psi, "bytes": counted, "total": sum(counted.values())}


def main() -> None:
    from ds_core.testing import run_distributed

    for world in (2, 4):
        for stage in (0, 1, 2):
            res = run_distributed(_measure, world, stage)[0]
            psi = res["psi"]
            formula = {0: 16 * psi, 1: 4 * psi + 12 * psi / world, 2: 2 * psi + 14 * psi / world}[stage]
            print(
                json.dumps(
                    {
                        "bench": "zero_memory",
                        "stage": stage,
                        "world": world,
                        "dtype": "bf16",
                        "optimizer": "AdamW",
                        "psi": psi,
                        "measured_bytes": res["total"],
                        "formula_bytes": int(formula),
                        "ratio": round(res["total"] / formula, 4),
                        "by_kind": res["bytes"],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
