"""ZeRO-3 steps the optimizer over chunks of the fp32 master shard (zero/chunked_step.py).

With the chunk shrunk to 37 elements every parameter's piece spans several chunks and chunks span
parameters, so these check the chunk bookkeeping: training follows the single-process torch reference
(the tolerances of test_train_stage3.py: fp32 losses 1e-5 / weights 2e-5, bf16 1e-2 relative / 3e-2),
resume with the same chunks is bit-exact, the checkpoint keeps one flat tensor per group (a 37-element
chunk engine's optimizer state loads bit-exactly into a default-chunk engine), and the safe_get/set
optimizer-state API reads and writes across chunk boundaries.
"""
from __future__ import annotations

import os

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import make_batch, reference_train
from ds_train.zero.stage3_testing import MODEL_FNS, stage3_config, train_engine

STEPS = 6
TOL = {"fp32": (1e-5, 2e-5), "bf16": (1e-2, 3e-2)}
SMALL = 37

VARIANTS = {
    "plain": {},
    "cpu": {"offload": "cpu"},  # params and optimizer in host memory: the master is the shard (MasterTier)
    # master on the host, model-dtype shards apart from it: they follow the master chunk by chunk
    "optimizer_cpu": {"offload_optimizer": {"device": "cpu"}},
}


class _Chunk:
    """Sets stage3._STEP_CHUNK for engines built inside (the worker processes are reused: restored)."""

    def __init__(self, size: int | None) -> None:
        self.size = size

    def __enter__(self) -> None:
        from ds_train.zero import stage3

        self.saved = stage3._STEP_CHUNK
        if self.size is not None:
            stage3._STEP_CHUNK = self.size

    def __exit__(self, *exc: object) -> None:
        from ds_train.zero import stage3

        stage3._STEP_CHUNK = self.saved


def _config(dtype: str, variant: str) -> dict:
    return stage3_config(dtype, 2, **VARIANTS[variant])


def _train_and_resume(dtype: str, variant: str, base: str) -> dict:
    from ds_core import comm

    with _Chunk(SMALL):
        straight = train_engine(_config(dtype, variant), "tiny", 0, STEPS)
        ckpt = os.path.join(base, "ckpt")
        first = train_engine(_config(dtype, variant), "tiny", 0, STEPS // 2, save_dir=ckpt)
        comm.barrier()
        second = train_engine(_config(dtype, variant), "tiny", STEPS // 2, STEPS, load_dir=ckpt)
    return {"straight": straight, "resumed": (first[0] + second[0], second[1])}


@pytest.mark.parametrize("dtype,variant", [("fp32", "plain"), ("bf16", "plain"), ("bf16", "cpu"),
                                           ("bf16", "optimizer_cpu")])
def test_small_step_chunks_match_reference_and_resume_exactly(dtype: str, variant: str, tmp_path) -> None:
    results = run_distributed(_train_and_resume, 2, dtype, variant, str(tmp_path))
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    ref_losses, ref_params = reference_train(STEPS, 1, 2, torch_dtype, model_fn=MODEL_FNS["tiny"])
    loss_tol, param_tol = TOL[dtype]
    for rank, res in enumerate(results):
        losses, params = res["straight"]
        for step in range(STEPS):
            want, got = ref_losses[step][rank], losses[step][0]
            assert abs(got - want) <= loss_tol * (1 if dtype == "fp32" else abs(want)), (rank, step, got, want)
        for name, ref in ref_params.items():
            err = (params[name] - ref).abs().max().item()
            assert err <= param_tol, f"rank {rank}: {name} differs by {err:.3g} (tolerance {param_tol})"
        resumed_losses, resumed_params = res["resumed"]
        assert resumed_losses == losses, "resume changed the losses"
        for name, t in params.items():
            assert torch.equal(resumed_params[name], t), f"resume changed {name}"


def _chunk_layout_and_state_roundtrip(base: str) -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.testing import lm_loss
    from ds_train.zero import safe_get_full_optimizer_state, safe_set_full_optimizer_state

    rank = comm.get_rank()
    out: dict = {}
    with _Chunk(SMALL):
        engine, *_ = ds_train.initialize(model=MODEL_FNS["tiny"](), config=_config("bf16", "plain"))
        s = engine.strategy
        master = s.master[0]
        pieces = s.optimizer.param_groups[0]["params"]
        out["pieces"] = len(pieces)
        out["pieces_cover_master"] = sum(p.numel() for p in pieces) == master.numel()
        out["pieces_are_views"] = all(p.untyped_storage().data_ptr() == master.untyped_storage().data_ptr()
                                      for p in pieces)
        out["batches"] = len(s._batches)
        for step in range(3):
            ids = make_batch(step, 0, rank)
            engine.backward(lm_loss(engine(ids), ids))
            engine.step()
        out["steps"] = sorted({float(s.optimizer.state[p]["step"]) for p in pieces})
        # a whole state tensor written through the API lands at the parameter's place in every chunk
        weight = engine.module.up.weight
        value = torch.arange(weight.ds3.numel, dtype=torch.float32).view(weight.ds3.shape) / 7
        safe_set_full_optimizer_state(weight, value, "exp_avg")
        out["roundtrip"] = torch.equal(safe_get_full_optimizer_state(weight, "exp_avg"), value)
        tensors, _ = s.shard_state()
        rec = weight.ds3
        lo = rank * rec.shard_numel
        expect = value.reshape(-1)[lo : min(lo + rec.shard_numel, rec.numel)]
        out["in_flat_state"] = torch.equal(
            tensors["g0.exp_avg"][rec.shard_offset : rec.shard_offset + expect.numel()], expect)
        out["saved_state"] = {k: v.clone() for k, v in tensors.items()}
        engine.save_checkpoint(os.path.join(base, "ckpt"), tag="t")
        engine.destroy()
    comm.barrier()
    # the same checkpoint into an engine with the default chunks: the flat state is identical
    engine, *_ = ds_train.initialize(model=MODEL_FNS["tiny"](), config=_config("bf16", "plain"))
    engine.load_checkpoint(os.path.join(base, "ckpt"), tag="t")
    out["default_pieces"] = len(engine.strategy.optimizer.param_groups[0]["params"])
    out["loaded_state"] = engine.strategy.shard_state()[0]
    engine.destroy()
    return out


def test_chunked_state_is_flat_in_checkpoints_and_reachable_through_the_api(tmp_path) -> None:
    for res in run_distributed(_chunk_layout_and_state_roundtrip, 2, str(tmp_path)):
        assert res["pieces"] > 10 and res["pieces_cover_master"] and res["pieces_are_views"]
        assert res["batches"] == res["pieces"]  # bf16 gradients: one chunk's fp32 copy at a time
        assert res["steps"] == [3.0]  # every chunk stepped on every step
        assert res["roundtrip"] and res["in_flat_state"]
        assert res["default_pieces"] == 1
        saved, loaded = res["saved_state"], res["loaded_state"]
        assert sorted(saved) == sorted(loaded) and {"g0.fp32", "g0.exp_avg", "g0.exp_avg_sq"} <= set(saved)
        for key, t in saved.items():
            assert torch.equal(loaded[key], t), key
