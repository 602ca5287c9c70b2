"""Curriculum schedules (DeepSpeed's formulas) and the seqlen batch transforms."""

import math

import pytest
import torch
from ds_core.config import ConfigError, parse_config
from ds_data.config import CurriculumLegacyConfig
from ds_data.curriculum import CurriculumScheduler, batch_seqlen, reshape_batch, truncate_batch


def legacy(schedule_type, schedule_config, lo=8, hi=64):
    return parse_config(
        CurriculumLegacyConfig,
        {
            "enabled": True,
            "curriculum_type": "seqlen",
            "min_difficulty": lo,
            "max_difficulty": hi,
            "schedule_type": schedule_type,
            "schedule_config": schedule_config,
        },
    )


def test_fixed_linear_matches_formula_and_reaches_max():
    sched = CurriculumScheduler(legacy("fixed_linear", {"total_curriculum_step": 100, "difficulty_step": 8}))
    for step in range(0, 130, 7):
        expected = math.floor(min(step / 100, 1.0) * (64 - 8) + 8)
        expected = min(max(expected - expected % 8, 8), 64)
        assert sched.update_difficulty(step) == expected
    assert sched.get_difficulty(100) == 64 and sched.get_difficulty(10_000) == 64
    values = [sched.get_difficulty(s) for s in range(120)]
    assert values == sorted(values) and all(v % 8 == 0 for v in values)


def test_fixed_root_grows_faster_early_than_linear():
    root = CurriculumScheduler(
        legacy("fixed_root", {"total_curriculum_step": 100, "difficulty_step": 1, "root_degree": 2})
    )
    lin = CurriculumScheduler(legacy("fixed_linear", {"total_curriculum_step": 100, "difficulty_step": 1}))
    assert root.get_difficulty(25) == math.floor(0.5 * 56 + 8) == 36
    assert lin.get_difficulty(25) == 22
    assert root.get_difficulty(100) == lin.get_difficulty(100) == 64


def test_fixed_discrete_stages():
    sched = CurriculumScheduler(legacy("fixed_discrete", {"difficulty": [8, 32, 64], "max_step": [5, 10]}))
    assert [sched.get_difficulty(s) for s in (0, 5, 6, 10, 11, 99)] == [8, 8, 32, 32, 64, 64]


def test_custom_schedule_needs_function():
    sched = CurriculumScheduler(legacy("custom", {}))
    with pytest.raises(RuntimeError, match="set_custom_get_difficulty"):
        sched.get_difficulty(3)
    sched.set_custom_get_difficulty(lambda step: 8 * (step + 1))
    assert sched.update_difficulty(3) == 32 and sched.get_current_difficulty() == 32


@pytest.mark.parametrize(
    "schedule_type, cfg, match",
    [
        ("fixed_linear", {"total_curriculum_step": 10}, "difficulty_step"),
        (
            "fixed_linear",
            {"total_curriculum_step": 10, "difficulty_step": 8, "root_degree": 2},
            "root_degree",
        ),
        ("fixed_discrete", {"difficulty": [8, 16], "max_step": [1, 2]}, "len\\(max_step\\)"),
        ("fixed_root", {"total_curriculum_step": 10, "difficulty_step": 8, "root_degre": 2}, "root_degre"),
    ],
)
def test_bad_schedule_config_is_rejected_by_name(schedule_type, cfg, match):
    with pytest.raises(ConfigError, match=match):
        legacy(schedule_type, cfg)


def test_state_roundtrip():
    a = CurriculumScheduler(legacy("fixed_linear", {"total_curriculum_step": 10, "difficulty_step": 8}))
    a.update_difficulty(7)
    b = CurriculumScheduler(legacy("fixed_linear", {"total_curriculum_step": 10, "difficulty_step": 8}))
    b.load_state_dict(a.state_dict())
    assert b.get_current_difficulty() == a.get_current_difficulty() != 8


def test_truncate_batch_cuts_every_sequence_tensor_and_keeps_others():
    ids = torch.arange(24).view(2, 12)
    batch = {
        "input_ids": ids,
        "labels": ids + 1,
        "attention_mask": torch.ones(2, 12),
        "mask4d": torch.ones(2, 1, 12, 12),
        "doc_id": torch.tensor([3, 4]),
        "name": "x",
    }
    out = truncate_batch(batch, 5)
    assert out["input_ids"].tolist() == ids[:, :5].tolist()
    assert out["labels"].shape == (2, 5) and out["attention_mask"].shape == (2, 5)
    assert out["mask4d"].shape == (2, 1, 5, 5)
    assert out["doc_id"].tolist() == [3, 4] and out["name"] == "x"
    assert truncate_batch((ids, ids), 4)[1].shape == (2, 4)
    assert truncate_batch(ids, 99) is ids
    flags = {"use_cache": False, "doc": torch.tensor([1, 2])}  # nothing with a sequence dimension
    assert truncate_batch(flags, 4) is flags and reshape_batch(flags, 4) is flags
    with pytest.raises(TypeError, match="sequence dimension"):
        batch_seqlen(flags)


def test_reshape_batch_keeps_all_tokens_and_restarts_positions():
    ids = torch.arange(24).view(2, 12)
    out = reshape_batch({"input_ids": ids, "position_ids": torch.arange(12).expand(2, 12)}, 4)
    assert out["input_ids"].shape == (6, 4)
    assert out["input_ids"].flatten().tolist() == list(range(24))
    assert out["position_ids"].tolist() == [[0, 1, 2, 3]] * 6
    with pytest.raises(ValueError, match="4-D attention mask"):
        reshape_batch({"input_ids": ids, "m": torch.ones(2, 1, 12, 12)}, 4)
