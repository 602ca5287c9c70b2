"""fp32 at stages 1/2 without offload: the master shard is this rank's pieces of the model's own flat
buffer (no separate 4 bytes/param/N copy); the optimizer updates them in place and the broadcast after
the step brings every rank the others' pieces. Numerics are covered by the reference-matching tests."""
from __future__ import annotations

import ds_train
import torch
from ds_core import comm
from ds_core.testing import run_distributed
from ds_train.testing import engine_config, lm_loss, make_batch, make_model


def _run(stage: int) -> dict:
    rank, world = comm.get_rank(), comm.get_world_size()
    engine, *_ = ds_train.initialize(model=make_model(), config=engine_config(stage, "fp32", 1, world))
    s = engine.strategy
    flat_ptr = s.flat[0].untyped_storage().data_ptr()
    opt_params = [p for g in s.optimizer.param_groups for p in g["params"]]
    for step in range(2):
        ids = make_batch(step, 0, rank)
        engine.backward(lm_loss(engine(ids), ids))
        engine.step()
    weights = torch.cat([p.detach().reshape(-1) for p in engine.module.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    torch.distributed.all_gather(gathered, weights)
    out = {
        "master_is_flat": s.master[0] is s.flat[0],
        "opt_params_in_flat": all(p.untyped_storage().data_ptr() == flat_ptr for p in opt_params),
        "separate_master_bytes": sum(t.numel() for t in s.model_state_tensors()["master"]),
        "ranks_agree": all(torch.equal(gathered[0], g) for g in gathered),
        "changed": not torch.equal(weights, torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])),
    }
    engine.destroy()
    return out


def test_fp32_master_is_the_model_buffer_at_stages_1_and_2() -> None:
    for stage in (1, 2):
        for res in run_distributed(_run, 2, stage):
            assert res == {"master_is_flat": True, "opt_params_in_flat": True, "separate_master_bytes": 0,
                           "ranks_agree": True, "changed": True}, (stage, res)
