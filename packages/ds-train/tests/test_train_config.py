"""The config tree: DeepSpeed keys and defaults, strict errors, batch-size arithmetic."""
from __future__ import annotations

import ds_train
import pytest
import torch
from ds_core.config import ConfigError
from ds_train.config import load_train_config, resolve_batch_sizes
from ds_train.testing import engine_config, make_model


def test_deepspeed_defaults() -> None:
    cfg = load_train_config({"train_batch_size": 8})
    z = cfg.zero_optimization
    assert (z.stage, z.reduce_bucket_size, z.allgather_bucket_size) == (0, 500_000_000, 500_000_000)
    # unset collectives: the strategy picks the backend's faster one (reduce-scatter, or all-reduce on gloo)
    assert (z.reduce_scatter, z.allgather_partitions) == (None, None)
    assert (cfg.fp16.initial_scale_power, cfg.fp16.loss_scale_window, cfg.fp16.hysteresis) == (16, 1000, 2)
    assert cfg.fp16.min_loss_scale == 1 and cfg.gradient_clipping == 0.0 and cfg.steps_per_print == 10


def test_unknown_key_names_path_and_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config({"train_batch_size": 8, "zero_optimization": {"stage": 1, "reduce_bucket_sise": 5}})
    assert "zero_optimization.reduce_bucket_sise" in str(err.value)
    assert "did you mean 'reduce_bucket_size'" in str(err.value)


@pytest.mark.parametrize("section", ["pipeline", "moe", "activation_checkpointing", "flops_profiler"])
def test_sections_of_later_issues_are_rejected_by_name(section: str) -> None:
    with pytest.raises(ConfigError, match=f"'{section}' is not supported yet"):
        load_train_config({"train_batch_size": 8, section: {}})


def test_deprecated_cpu_offload_maps_to_offload_optimizer() -> None:
    with pytest.warns(FutureWarning, match="cpu_offload"):
        cfg = load_train_config({"train_batch_size": 8, "zero_optimization": {"stage": 2, "cpu_offload": True}})
    assert cfg.zero_optimization.offload_optimizer_device == "cpu"


def test_scientific_notation_bucket_sizes() -> None:
    cfg = load_train_config({"train_batch_size": 8, "zero_optimization": {"reduce_bucket_size": 2e8}})
    assert cfg.zero_optimization.reduce_bucket_size == 200_000_000


@pytest.mark.parametrize(
    ("given", "world", "want"),
    [
        ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (32, 4, 4)),
        ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 4, (32, 4, 2)),
        ({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5}, 2, (30, 3, 5)),
        ({"train_batch_size": 8}, 2, (8, 4, 1)),
        ({"train_micro_batch_size_per_gpu": 2}, 4, (8, 2, 1)),
        ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2}, 2,
         (16, 4, 2)),
    ],
)
def test_any_two_batch_keys_determine_the_third(given: dict, world: int, want: tuple) -> None:
    cfg = load_train_config(given)
    assert resolve_batch_sizes(cfg, world) == want


def test_inconsistent_batch_sizes_show_the_arithmetic() -> None:
    cfg = load_train_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                             "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match=r"train_batch_size \(30\).*\(4\) x .*\(2\) x .*\(2\) = 16"):
        resolve_batch_sizes(cfg, 2)
    with pytest.raises(ConfigError, match="neither"):
        resolve_batch_sizes(load_train_config({}), 1)


def test_fp16_and_bf16_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match="choose one"):
        load_train_config({"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_unresolved_auto_is_named() -> None:
    cfg = engine_config(0, "fp32", 1, 1)
    cfg["gradient_clipping"] = "auto"
    with pytest.raises(ConfigError, match="gradient_clipping"):
        ds_train.initialize(model=make_model(), config=cfg)


def test_lamb_runs_at_stages_0_to_2_and_is_refused_at_stage_3() -> None:
    cfg = engine_config(3, "fp32", 1, 1)
    cfg["optimizer"] = {"type": "Lamb", "params": {"lr": 1e-3}}
    with pytest.raises(ConfigError, match="elementwise"):
        ds_train.initialize(model=make_model(), config=cfg)
    for stage in (0, 1, 2):
        cfg["zero_optimization"]["stage"] = stage
        engine, opt, *_ = ds_train.initialize(model=make_model(), config=cfg)
        assert type(opt).__name__ == "Lamb"
        engine.destroy()


def test_unknown_optimizer_params_are_errors() -> None:
    cfg = engine_config(1, "fp32", 1, 1)
    cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3, "beta": [0.9, 0.9]}}
    with pytest.raises(ConfigError, match="beta"):
        ds_train.initialize(model=make_model(), config=cfg)
    cfg["optimizer"] = {"type": "Adafactor", "params": {}}
    with pytest.raises(ConfigError, match="Adafactor"):
        ds_train.initialize(model=make_model(), config=cfg)


def test_offload_with_a_plain_torch_optimizer_is_refused() -> None:
    cfg = engine_config(2, "fp32", 1, 1)
    del cfg["optimizer"]
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    model = make_model()
    with pytest.raises(ConfigError, match="DSCPUAdam"):
        ds_train.initialize(model=model, config=cfg, optimizer=torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD", "Adagrad", "Lion", "Lamb"])
def test_every_config_optimizer_trains(optimizer: str) -> None:
    cfg = engine_config(0 if optimizer == "Lamb" else 1, "fp32", 1, 1)
    cfg["optimizer"] = {"type": optimizer, "params": {"lr": 1e-3}}
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg)
    ids = torch.randint(0, 10, (3, 8))
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    from ds_train.testing import lm_loss

    for _ in range(2):
        engine.backward(lm_loss(engine(ids), ids))
        engine.step()
    assert any(not torch.equal(before[n], p) for n, p in engine.module.named_parameters())
