"""Engine behaviour: DeepSpeed-style scripts, fp16 overflow skipping, no_sync, offload, 16-bit export."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import ds_train
import ds_train as deepspeed
import pytest
import torch
from ds_train.precision import DynamicLossScaler
from ds_train.testing import engine_config, lm_loss, make_batch, make_model


def test_dynamic_loss_scaler_follows_deepspeed_rule() -> None:
    s = DynamicLossScaler(init_scale=2.0**4, scale_window=3, min_scale=2.0, delayed_shift=2)
    s.update_scale(True)  # first overflow spends hysteresis
    assert s.loss_scale == 16
    s.update_scale(True)  # second halves
    assert s.loss_scale == 8
    for _ in range(2):
        s.update_scale(False)
    assert s.loss_scale == 8
    s.update_scale(False)  # 3 clean iterations since the overflow at iteration 1
    assert s.loss_scale == 16
    for _ in range(10):
        s.update_scale(True)
    assert s.loss_scale == 2.0  # never below min_loss_scale


def test_deepspeed_script_runs_unchanged(tmp_path: Path) -> None:
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(engine_config(0, "fp32", 2, 1)))
    parser = argparse.ArgumentParser()
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", str(config)])
    from ds_core import comm

    owned = not comm.is_initialized()
    deepspeed.init_distributed()  # without a launcher: a world of one
    try:
        _train_two_steps(args, tmp_path)
    finally:
        if owned and comm.is_initialized():
            comm.destroy_process_group()  # leave no process group behind for later tests


def _train_two_steps(args: argparse.Namespace, tmp_path: Path) -> None:
    model = make_model()
    engine, optimizer, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    engine.train()
    boundaries = []
    for step in range(2):
        for micro in range(2):
            ids = make_batch(step, micro, 0)
            boundaries.append(engine.is_gradient_accumulation_boundary())
            loss = lm_loss(engine(ids), ids)
            engine.backward(loss)
            engine.step()
    assert boundaries == [False, True, False, True]
    assert engine.global_steps == 2 and engine.micro_steps == 4
    assert engine.get_lr() == [1e-2] and engine.get_global_grad_norm() > 0
    engine.eval()
    assert not engine.module.training
    engine.save_16bit_model(str(tmp_path), "model.safetensors")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(weights["up.weight"], engine.module.up.weight.detach())


def test_fp16_overflow_skips_the_step_and_the_schedule() -> None:
    cfg = engine_config(2, "fp16", 1, 1)
    cfg["fp16"]["hysteresis"] = 1
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_max_lr": 1e-2}}
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg)
    ids = make_batch(0, 0, 0)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    scale = engine.cur_scale
    engine.backward(lm_loss(engine(ids), ids) * float("inf"))
    engine.step()
    assert engine.skipped_steps == 1 and engine.global_steps == 1 and not engine.was_step_applied()
    assert engine.cur_scale == scale / 2
    assert engine.lr_scheduler.last_batch_iteration == -1
    assert all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    assert engine.was_step_applied() and engine.lr_scheduler.last_batch_iteration == 0


def test_no_sync_is_refused_at_stage_2_and_at_the_boundary() -> None:
    engine, *_ = ds_train.initialize(model=make_model(), config=engine_config(2, "fp32", 2, 1))
    with pytest.raises(RuntimeError, match="stage 2"):
        with engine.no_sync():
            pass
    engine, *_ = ds_train.initialize(model=make_model(), config=engine_config(1, "fp32", 2, 1))
    ids = make_batch(0, 0, 0)
    with engine.no_sync():
        engine.backward(lm_loss(engine(ids), ids))
        engine.step()
        engine.backward(lm_loss(engine(ids), ids))
        with pytest.raises(RuntimeError, match="no_sync"):
            engine.step()


def test_cpu_offload_keeps_master_and_state_in_a_separate_host_buffer_and_uses_cpu_adam() -> None:
    from ds_kernels.optim import DSCPUAdam

    cfg = engine_config(2, "bf16", 1, 1)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, optimizer, *_ = ds_train.initialize(model=make_model(), config=cfg)
    assert isinstance(optimizer, DSCPUAdam)
    master = engine.strategy.master[0]
    assert master.dtype == torch.float32 and master.device.type == "cpu"
    assert master.untyped_storage().data_ptr() != engine.strategy.flat[0].untyped_storage().data_ptr()
    ids = make_batch(0, 0, 0)
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    # the optimizer's parameters are chunks of the host master buffer (stepped a chunk at a time)
    pieces = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in pieces) == master.numel()
    assert all(p.untyped_storage().data_ptr() == master.untyped_storage().data_ptr() for p in pieces)
    assert all(optimizer.state[p]["step"] == 1 for p in pieces)
    assert sum(optimizer.state[p]["exp_avg"].abs().sum() for p in pieces) > 0
    # the model's bf16 weights are the rounded master weights
    assert torch.equal(engine.strategy.flat[0], master.to(torch.bfloat16))


def test_client_optimizer_and_scheduler_callables() -> None:
    cfg = engine_config(1, "fp32", 1, 1)
    del cfg["optimizer"]
    model = make_model()
    engine, opt, _, sched = ds_train.initialize(
        model=model, config=cfg, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
    )
    assert isinstance(opt, torch.optim.SGD)
    ids = make_batch(0, 0, 0)
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    assert engine.get_lr() == [pytest.approx(0.05)]


def test_frozen_parameters_stay_frozen() -> None:
    model = make_model()
    model.up.weight.requires_grad_(False)
    frozen = model.up.weight.detach().clone()
    engine, *_ = ds_train.initialize(model=model, config=engine_config(2, "fp32", 1, 1))
    ids = make_batch(0, 0, 0)
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    assert torch.equal(engine.module.up.weight, frozen)
    assert "up.weight" not in engine.get_fp32_state_dict()


def test_csv_monitor_writes_loss(tmp_path: Path) -> None:
    cfg = engine_config(0, "fp32", 1, 1, csv_monitor={"enabled": True, "output_path": str(tmp_path), "job_name": "j"})
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg)
    ids = make_batch(0, 0, 0)
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    lines = (tmp_path / "j" / "Train_Samples_train_loss.csv").read_text().splitlines()
    assert lines[0] == "step,Train/Samples/train_loss" and len(lines) == 2
