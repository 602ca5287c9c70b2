"""LR schedules reproduce DeepSpeed's numbers step by step (values computed by hand from its formulas)."""
from __future__ import annotations

import math

import pytest
import torch
from ds_core.config import ConfigError
from ds_train.schedulers import (
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
)


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _trace(sched, opt, n: int) -> list[float]:
    """lr used by optimizer steps 1..n (the engine steps the schedule after each applied step)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def test_warmup_lr_first_step_runs_at_min_lr_then_log_warmup() -> None:
    opt = _opt()
    s = WarmupLR(opt, warmup_min_lr=0.01, warmup_max_lr=0.1, warmup_num_steps=10)
    lrs = _trace(s, opt, 13)
    assert lrs[0] == pytest.approx(0.01)  # construction sets min lr
    assert lrs[1] == pytest.approx(0.01)  # iteration 0: log(1) = 0
    assert lrs[2] == pytest.approx(0.01 + 0.09 * math.log(2) / math.log(10))
    assert lrs[10] == pytest.approx(0.01 + 0.09 * math.log(10) / math.log(10))
    assert lrs[12] == pytest.approx(0.1)


def test_warmup_lr_linear_and_default_max_from_optimizer() -> None:
    opt = _opt(lr=0.5)
    s = WarmupLR(opt, warmup_num_steps=4, warmup_type="linear")
    lrs = _trace(s, opt, 7)
    assert lrs == pytest.approx([0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5])


def test_warmup_decay_lr_decays_linearly_to_zero() -> None:
    opt = _opt()
    s = WarmupDecayLR(opt, total_num_steps=20, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10,
                      warmup_type="linear")
    lrs = _trace(s, opt, 23)
    assert lrs[11] == pytest.approx(0.1)  # iteration 10: (20 - 10) / 10
    assert lrs[16] == pytest.approx(0.05)  # iteration 15
    assert lrs[21] == pytest.approx(0.0) and lrs[22] == pytest.approx(0.0)


def test_warmup_cosine_lr_starts_at_zero_and_ends_at_min_ratio() -> None:
    opt = _opt(lr=0.2)
    s = WarmupCosineLR(opt, total_num_steps=12, warmup_min_ratio=0.1, warmup_num_steps=4, cos_min_ratio=0.01,
                       warmup_type="linear")
    lrs = _trace(s, opt, 16)
    assert lrs[0] == 0.0  # DeepSpeed: before the first scheduler step the ratio is 0
    assert lrs[1] == pytest.approx(0.2 * 0.1)
    assert lrs[3] == pytest.approx(0.2 * (0.1 + 0.5 * 0.9))
    # iteration 4: first cosine step, progress 1/8
    assert lrs[5] == pytest.approx(0.2 * (0.01 + 0.99 * (1 + math.cos(math.pi / 8)) / 2))
    assert lrs[15] == pytest.approx(0.2 * 0.01)  # clamped at the floor past the end


def test_one_cycle_lr_and_momentum() -> None:
    opt = _opt()
    s = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4, cycle_min_mom=0.8,
                 cycle_max_mom=0.9, decay_lr_rate=0.5, decay_step_size=2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    s.step()  # iteration 0 -> scale (0 + 1) / 4
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 + 0.09 * 0.25)
    assert opt.param_groups[0]["betas"][0] == pytest.approx(0.9 - 0.1 * 0.25)
    for _ in range(3):
        s.step()  # iteration 3 -> the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    for _ in range(6):
        s.step()  # iteration 9: decay interval (9 - 8 + 1) / 2 = 1
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 1.5)


def test_lr_range_test_continuous_and_staircase() -> None:
    opt = _opt()
    s = LRRangeTest(opt, lr_range_test_min_lr=0.01, lr_range_test_step_size=5, lr_range_test_step_rate=1.0)
    assert _trace(s, opt, 3) == pytest.approx([0.01, 0.012, 0.014])
    opt = _opt()
    s = LRRangeTest(opt, lr_range_test_min_lr=0.01, lr_range_test_step_size=2, lr_range_test_staircase=True)
    assert _trace(s, opt, 5) == pytest.approx([0.01, 0.01, 0.02, 0.02, 0.03])


def test_state_dict_round_trip_restores_the_lr() -> None:
    opt = _opt()
    s = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10)
    for _ in range(5):
        s.step()
    state = s.state_dict()
    opt2 = _opt()
    s2 = WarmupLR(opt2, warmup_min_lr=0.0, warmup_max_lr=0.1, warmup_num_steps=10)
    s2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s.step(), s2.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_build_scheduler_rejects_unknown_names_and_params() -> None:
    with pytest.raises(ConfigError, match="unknown schedule 'Cosine'"):
        build_scheduler("Cosine", {}, _opt())
    with pytest.raises(ConfigError, match="warmup_steps"):
        build_scheduler("WarmupLR", {"warmup_steps": 3}, _opt())
    with pytest.raises(ConfigError, match="positive integer"):
        build_scheduler("WarmupLR", {"warmup_num_steps": 0}, _opt())
