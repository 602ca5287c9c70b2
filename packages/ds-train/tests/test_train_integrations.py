"""Optional packages driven by the config: ds-data (curriculum) and ds-compression (compression training)."""
from __future__ import annotations

import sys

import ds_train
import pytest
from ds_core.config import ConfigError
from ds_train.testing import engine_config, lm_loss, make_batch, make_model


def test_seqlen_curriculum_truncates_batches_on_schedule() -> None:
    pytest.importorskip("ds_data.integration")
    cfg = engine_config(1, "fp32", 1, 1)
    cfg["curriculum_learning"] = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 4,
                                  "max_difficulty": 8, "schedule_type": "fixed_linear",
                                  "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 2}}
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg)
    seen = []
    for step in range(6):
        ids = make_batch(step, 0, 0)
        logits = engine(ids)
        seen.append(logits.shape[1])
        engine.backward(lm_loss(logits, ids[:, : logits.shape[1]]))
        engine.step()
    assert seen[0] < 8 and seen[-1] == 8 and seen == sorted(seen)


def test_compression_training_wraps_layers_and_steps_the_schedule() -> None:
    pytest.importorskip("ds_compression")
    cfg = engine_config(2, "fp32", 1, 1)
    cfg["compression_training"] = {"weight_quantization": {
        "shared_parameters": {"enabled": True, "schedule_offset": 2, "quantization_type": "symmetric"},
        "different_groups": {"wq": {"params": {"start_bits": 8, "target_bits": 8, "quantization_period": 1},
                                    "modules": ["up"]}}}}
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg)
    from ds_compression.training.layers import CompressedLinear

    assert isinstance(engine.module.up, CompressedLinear)
    bits = []
    for step in range(4):
        ids = make_batch(step, 0, 0)
        engine.backward(lm_loss(engine(ids), ids))
        engine.step()
        bits.append(engine.module.up.weight_bits)
    assert bits[0] is None and bits[-1] == 8


def test_missing_optional_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ds_compression", None)  # as if not installed
    cfg = engine_config(0, "fp32", 1, 1)
    cfg["compression_training"] = {}
    with pytest.raises(ConfigError, match="pip install ds-compression"):
        ds_train.initialize(model=make_model(), config=cfg)


def _ltd_config(total_num_steps: int | None) -> dict:
    cfg = engine_config(2, "fp32", 1, 1)
    cfg["train_micro_batch_size_per_gpu"] = 4
    cfg["data_efficiency"] = {"enabled": True, "seed": 5, "data_routing": {"enabled": True, "random_ltd": {
        "enabled": True, "total_layer_num": 4, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
        "random_ltd_schedule": {"min_value": 4, "max_value": 16, "schedule_type": "fixed_linear",
                                "schedule_config": {"require_steps": 6, "seq_per_step": 4}},
        # no total_layer_tokens: it must come from the run's length
        "layer_token_lr_schedule": {"enabled": True, "warmup_layer_tokens": 0}}}}
    if total_num_steps is not None:
        cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 1,
                                                                 "total_num_steps": total_num_steps}}
    return cfg


def _gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def test_layer_token_lr_is_sized_by_the_training_length() -> None:
    pytest.importorskip("ds_data.integration")
    engine, *_ = ds_train.initialize(model=_gpt2(), config=_ltd_config(10))
    impl = engine.data_efficiency.impl
    assert impl.token_lr.total == impl.random_ltd.get_total_layer_tokens(10)
    raw = _ltd_config(10)  # an explicit length wins over the schedule's
    explicit = ds_train.DeepSpeedEngine(_gpt2(), ds_train.load_train_config(raw), raw, train_iters=20)
    assert explicit.data_efficiency.impl.token_lr.total == impl.random_ltd.get_total_layer_tokens(20)
    assert explicit.data_efficiency.impl.token_lr.total > impl.token_lr.total


def test_initialize_takes_the_training_length_from_args_train_iters() -> None:
    """Megatron-DeepSpeed scripts carry the run's length in ``args.train_iters``."""
    pytest.importorskip("ds_data.integration")
    import argparse

    engine, *_ = ds_train.initialize(args=argparse.Namespace(train_iters=7), model=_gpt2(), config=_ltd_config(None))
    impl = engine.data_efficiency.impl
    assert impl.token_lr.total == impl.random_ltd.get_total_layer_tokens(7)


def test_layer_token_lr_without_a_training_length_says_where_to_give_it() -> None:
    pytest.importorskip("ds_data.integration")
    with pytest.raises(ConfigError, match="total_num_steps"):
        ds_train.initialize(model=_gpt2(), config=_ltd_config(None))
