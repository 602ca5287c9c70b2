"""ZeRO-3 user API: GatheredParameters, safe_get/set_full_*, 16-bit consolidation, zero.Init, resharding.

Distributed values are compared with single-process torch (exact for fp32 gathers; 1e-5 for trained
weights); checkpoints move between world sizes and between stages 2 and 3 without loss (bit-exact).
"""
from __future__ import annotations

import os

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import TinyLM, make_batch, make_model, reference_train
from ds_train.zero.stage3_testing import stage3_config, train_engine


def _api_worker(base: str) -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.testing import lm_loss
    from ds_train.zero import (
        GatheredParameters,
        safe_get_full_fp32_param,
        safe_get_full_grad,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    rank = comm.get_rank()
    cfg = stage3_config("fp32", 2, stage3_gather_16bit_weights_on_model_save=True)
    model = make_model()
    reference = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    out: dict = {"empty_between_uses": all(p.numel() == 0 for p in model.parameters())}
    # reading whole parameters outside forward
    with GatheredParameters(list(model.parameters())):
        out["gathered_equal"] = all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    out["released_after"] = all(p.numel() == 0 for p in model.parameters())
    # gradients between backward and step
    ids = make_batch(0, 0, rank)
    loss = lm_loss(engine(ids), ids)
    engine.backward(loss)
    out["grad"] = safe_get_full_grad(model.up.weight)
    engine.step()
    out["exp_avg"] = safe_get_full_optimizer_state(model.up.weight, "exp_avg")
    safe_set_full_optimizer_state(model.up.weight, torch.full((73, 24), 0.25), "exp_avg")
    out["exp_avg_roundtrip"] = safe_get_full_optimizer_state(model.up.weight, "exp_avg")
    # changing a weight on one rank and broadcasting it
    with GatheredParameters(model.down.bias, modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                model.down.bias.fill_(0.5)
    out["modified_master"] = safe_get_full_fp32_param(model.down.bias)
    safe_set_full_fp32_param(model.norm.weight, torch.full((24,), 2.0))
    out["set_master"] = safe_get_full_fp32_param(model.norm.weight)
    with GatheredParameters(model.norm.weight):
        out["set_model_copy"] = model.norm.weight.detach().clone()
    # 16-bit consolidation and save
    out["consolidated"] = engine._zero3_consolidated_16bit_state_dict()
    out["fp32"] = engine.get_fp32_state_dict()
    out["saved"] = engine.save_16bit_model(base, "model.bin")
    comm.barrier()
    out["saved_file"] = torch.load(os.path.join(base, "model.bin")) if rank == 0 else None
    engine.destroy()
    return out


def test_stage3_user_api_matches_single_process(tmp_path) -> None:
    results = run_distributed(_api_worker, 2, str(tmp_path))
    # single-process gradient of the same step: mean over both ranks' batches
    model = make_model()
    from ds_train.testing import lm_loss

    for rank in range(2):
        ids = make_batch(0, 0, rank)
        (lm_loss(model(ids), ids) / 2).backward()
    for res in results:
        assert res["empty_between_uses"] and res["released_after"] and res["gathered_equal"]
        torch.testing.assert_close(res["grad"], model.up.weight.grad, rtol=1e-5, atol=1e-6)
        assert res["exp_avg"].shape == (73, 24) and res["exp_avg"].abs().sum() > 0
        assert torch.equal(res["exp_avg_roundtrip"], torch.full((73, 24), 0.25))
        assert torch.equal(res["modified_master"], torch.full((24,), 0.5))
        assert torch.equal(res["set_master"], torch.full((24,), 2.0))
        assert torch.equal(res["set_model_copy"], torch.full((24,), 2.0))
        assert res["saved"] is True
    consolidated = results[0]["consolidated"]
    assert results[1]["consolidated"] == {}
    for name, t in results[0]["fp32"].items():
        assert torch.equal(consolidated[name], t), name
        assert torch.equal(results[0]["saved_file"][name], t), name
    assert torch.equal(consolidated["head.weight"], consolidated["embed.weight"])  # tied


def _save_16bit_refused(base: str) -> bool:
    import ds_train

    engine, *_ = ds_train.initialize(model=make_model(), config=stage3_config("bf16", 2))
    try:
        return engine.save_16bit_model(base)
    finally:
        engine.destroy()


def test_stage3_save_16bit_model_needs_the_gather_flag(tmp_path) -> None:
    assert run_distributed(_save_16bit_refused, 2, str(tmp_path)) == [False, False]
    assert not os.listdir(tmp_path)


def _save_stage3(base: str) -> tuple:
    return train_engine(stage3_config("fp32", 2), "tiny", 0, 4, save_dir=os.path.join(base, "ckpt"))


def _load_anywhere(base: str, stage: int, world: int) -> dict:
    import ds_train
    from ds_train.testing import engine_config

    cfg = stage3_config("fp32", world) if stage == 3 else engine_config(stage, "fp32", 1, world)
    engine, *_ = ds_train.initialize(model=make_model(seed=7), config=cfg)
    engine.load_checkpoint(os.path.join(base, "ckpt"))
    state = engine.get_fp32_state_dict()
    engine.destroy()
    return state


def test_stage3_checkpoint_reshards_to_other_world_sizes_and_stages(tmp_path) -> None:
    base = str(tmp_path)
    saved = run_distributed(_save_stage3, 2, base)[0][1]
    for stage, world in ((3, 4), (2, 2), (3, 1)):
        loaded = run_distributed(_load_anywhere, world, base, stage, world)
        for name, t in saved.items():
            assert torch.equal(loaded[0][name], t), (stage, world, name)
    from ds_train.checkpoint.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    offline = get_fp32_state_dict_from_zero_checkpoint(os.path.join(base, "ckpt"))
    for name, t in saved.items():
        assert torch.equal(offline[name], t), name


def _init_worker(cfg: dict) -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.testing import lm_loss
    from ds_train.zero import GatheredParameters, Init

    rank = comm.get_rank()
    torch.manual_seed(100 + rank)  # ranks draw different values: Init must broadcast rank 0's
    with Init(config_dict_or_path=cfg):
        model = TinyLM()
    shard_sizes = {n: p.ds3.init_shard.numel() for n, p in model.named_parameters()}
    empty = all(p.numel() == 0 for p in model.parameters())
    with GatheredParameters(list(model.parameters())):
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    losses = []
    for step in range(6):
        ids = make_batch(step, 0, rank)
        loss = lm_loss(engine(ids), ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    final = engine.get_fp32_state_dict()
    engine.destroy()
    return {"shards": shard_sizes, "empty": empty, "initial": initial, "losses": losses, "final": final}


def test_zero_init_builds_partitioned_and_trains_like_single_process() -> None:
    cfg = stage3_config("fp32", 2)
    results = run_distributed(_init_worker, 2, cfg)
    assert all(r["empty"] for r in results)
    assert results[0]["shards"]["up.weight"] == (73 * 24 + 1) // 2  # half of each parameter, padded
    for name, t in results[0]["initial"].items():  # every rank starts from rank 0's draw
        assert torch.equal(results[1]["initial"][name], t)
    start = results[0]["initial"]
    ref_losses, ref_params = reference_train(6, 1, 2, torch.float32, start_state=start)
    for rank in range(2):
        for step in range(6):
            assert abs(results[rank]["losses"][step] - ref_losses[step][rank]) < 1e-5
    for name, t in ref_params.items():
        assert (results[0]["final"][name] - t).abs().max().item() < 2e-5, name


def test_zero_init_refuses_unsupported_arguments() -> None:
    from ds_train.zero import Init

    with pytest.raises(ValueError, match="remote_device"):
        Init(remote_device="nvme")
    with pytest.raises(ValueError, match="zero_quantized_weights"):
        Init(zero_quantized_weights=True)


def _pretrained_worker(path: str, kind: str) -> dict:
    import transformers
    from ds_train.zero import GatheredParameters
    from ds_train.zero.stage3_pretrained import from_pretrained_partitioned

    cls = transformers.GPT2LMHeadModel if kind == "gpt2" else transformers.LlamaForCausalLM
    model = from_pretrained_partitioned(cls, path, config=stage3_config("fp32", 2))
    empty = all(p.numel() == 0 for p in model.parameters())
    with GatheredParameters(list(model.parameters())):
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"empty": empty, "state": state}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_from_pretrained_partitioned_loads_a_transformers_checkpoint(tmp_path, kind: str) -> None:
    from ds_train.zero.stage3_testing import hf_model

    torch.manual_seed(3)
    original = hf_model(kind).model
    original.save_pretrained(tmp_path)
    results = run_distributed(_pretrained_worker, 2, str(tmp_path), kind)
    want = dict(original.named_parameters())
    for res in results:
        assert res["empty"]
        assert set(res["state"]) == set(want)
        for name, t in want.items():
            assert torch.equal(res["state"][name], t.detach()), name
