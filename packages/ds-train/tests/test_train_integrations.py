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
