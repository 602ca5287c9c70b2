"""LR schedules with DeepSpeed's semantics (0.19), so a migrated run sees the same learning rates.

Semantics shared by all: the schedule is indexed by ``last_batch_iteration``, which starts at -1;
construction sets the optimizer's lr for the first step (e.g. WarmupLR: ``warmup_min_lr``;
WarmupCosineLR: 0); the engine calls ``step()`` after every applied optimizer step (not after a
skipped fp16 step), which moves to iteration 0, 1, ... Each schedule's ``state_dict`` is
``{"last_batch_iteration": n}``, as DeepSpeed's.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Union

import torch
from ds_core.config import ConfigError
from ds_core.logging import logger

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest", "SCHEDULERS", "build_scheduler"]

LOG_RATE = "log"
LINEAR_RATE = "linear"
Number = Union[float, Sequence[float]]  # noqa: UP007 - runtime alias, py39


def _per_group(optimizer: torch.optim.Optimizer, value: Number, name: str) -> list[float]:
    groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name}: expected {groups} values (one per param group), got {len(value)}")
        return [float(v) for v in value]
    return [float(value)] * groups


def _set_lrs(optimizer: torch.optim.Optimizer, lrs: Sequence[float]) -> list[float]:
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return [group["lr"] for group in optimizer.param_groups]


class _Schedule:
    """Common state handling; subclasses define `get_lr()` for `self.last_batch_iteration`."""

    optimizer: torch.optim.Optimizer
    last_batch_iteration: int
    _last_lr: list[float] | None = None

    def get_lr(self) -> list[float]:
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _set_lrs(self.optimizer, self.get_lr())

    def get_last_lr(self) -> list[float]:
        if self._last_lr is None:
            raise RuntimeError("get_last_lr(): the schedule has not set a learning rate yet; call step() first")
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_batch_iteration = int(state["last_batch_iteration"])
        # Re-apply the lr the restored iteration implies, so the next step uses it (DeepSpeed relies on
        # the optimizer state for this; ours does not pickle optimizer param groups).
        if self.last_batch_iteration >= 0:
            self._last_lr = _set_lrs(self.optimizer, self.get_lr())


def _warmup_gamma(iteration: int, warmup_steps: int, warmup_type: str, inverse_log: float) -> float:
    if warmup_type == LOG_RATE:
        return inverse_log * math.log(iteration + 1)
    return iteration / warmup_steps


def _check_warmup(warmup_num_steps: Any, warmup_type: str) -> str:
    if not isinstance(warmup_num_steps, int) or isinstance(warmup_num_steps, bool) or warmup_num_steps <= 0:
        raise ValueError(f"warmup_num_steps must be a positive integer, got {warmup_num_steps!r}")
    if warmup_type not in (LOG_RATE, LINEAR_RATE):
        raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
    return warmup_type


class WarmupLR(_Schedule):
    """From ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps`` (log or linear), then flat."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_min_lr: Number = 0.0,
        warmup_max_lr: Number | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.warmup_type = _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = optimizer
        if warmup_max_lr is None:
            warmup_max_lr = optimizer.param_groups[0]["lr"]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(optimizer, self.get_lr())

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_gamma(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type,
                                 self.inverse_log_warm_up)
        return 1.0

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + d * gamma for lo, d in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then a linear decay to 0 at ``total_num_steps``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_lr: Number = 0.0,
        warmup_max_lr: Number = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = int(total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning(f"total_num_steps {total_num_steps} is less than warmup_num_steps {warmup_num_steps}")

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._gamma()
        remaining = float(self.total_num_steps - self.last_batch_iteration)
        return max(0.0, remaining / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Schedule):
    """Ratio of the optimizer's lr: warm up from ``warmup_min_ratio`` to 1, then cosine to ``cos_min_ratio``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = LOG_RATE,
        last_batch_iteration: int = -1,
    ) -> None:
        self.warmup_type = _check_warmup(warmup_num_steps, warmup_type)
        self.optimizer = optimizer
        self.total_num_steps = int(total_num_steps)
        self.last_batch_iteration = last_batch_iteration
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning(f"total_num_steps {total_num_steps} is less than warmup_num_steps {warmup_num_steps}")
        self.org_lrs = [group["lr"] for group in optimizer.param_groups]
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(optimizer, self.get_lr())

    def get_lr_ratio(self) -> float:
        it = self.last_batch_iteration
        if it < 0:
            return 0.0
        if it < self.warmup_num_steps:
            ratio = _warmup_gamma(it, self.warmup_num_steps, self.warmup_type, self.inverse_log_warm_up)
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        done = it - self.warmup_num_steps + 1
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, done / span)  # stay at the floor past the end instead of rising again
        cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]

    def state_dict(self) -> dict[str, Any]:
        # org_lrs is the base the ratio multiplies; it must survive a restart where the optimizer's
        # current lr is already scaled.
        return {"last_batch_iteration": self.last_batch_iteration, "org_lrs": list(self.org_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "org_lrs" in state:
            self.org_lrs = [float(v) for v in state["org_lrs"]]
        super().load_state_dict(state)


class LRRangeTest(_Schedule):
    """Grow the lr from ``lr_range_test_min_lr`` by ``step_rate`` per ``step_size`` iterations."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_range_test_min_lr: Number = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ) -> None:
        if lr_range_test_step_size <= 0:
            raise ValueError(f"lr_range_test_step_size must be > 0, got {lr_range_test_step_size}")
        self.optimizer = optimizer
        self.min_lr = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = lr_range_test_step_size
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _set_lrs(optimizer, self.min_lr)

    def _interval(self) -> float:
        x = float(self.last_batch_iteration + 1) / self.step_size
        return math.floor(x) if self.staircase else x

    def get_lr(self) -> list[float]:
        increase = 1 + self.step_rate * self._interval()
        return [lr * increase for lr in self.min_lr]


class OneCycle(_Schedule):
    """1Cycle: lr up from ``cycle_min_lr`` to ``cycle_max_lr`` and back (momentum inversely), then decay."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cycle_min_lr: float,
        cycle_max_lr: float,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float = 0.8,
        cycle_max_mom: float = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        self.optimizer = optimizer
        first = float(cycle_first_step_size)
        second = float(cycle_second_step_size) if cycle_second_step_size is not None else first
        self.first_step_size, self.second_step_size = first, second
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        self.skip_lr_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_lr_rate, 0)
        self.skip_mom_decay = math.isclose(decay_step_size, 0) or math.isclose(decay_mom_rate, 0)
        groups = len(optimizer.param_groups)
        self.min_lrs = [float(cycle_min_lr)] * groups
        self.max_lrs = [float(cycle_max_lr)] * groups
        self.decay_lr_rate = float(decay_lr_rate)
        if last_batch_iteration == -1:
            _set_lrs(optimizer, self.min_lrs)
        self.cycle_momentum = bool(cycle_momentum)
        if self.cycle_momentum and "betas" not in optimizer.defaults:
            logger.warning(f"OneCycle: cycle_momentum disabled: {type(optimizer).__name__} has no betas")
            self.cycle_momentum = False
        if self.cycle_momentum:
            self.decay_mom_rate = float(decay_mom_rate)
            self.min_moms = [(float(cycle_min_mom), 0.99)] * groups
            self.max_moms = [(float(cycle_max_mom), 0.99)] * groups
            if last_batch_iteration == -1:
                for group, mom in zip(optimizer.param_groups, self.min_moms):
                    group["betas"] = mom
        self.last_batch_iteration = last_batch_iteration

    def _scale_factor(self) -> float:
        it = self.last_batch_iteration + 1
        cycle = math.floor(1 + it / self.total_size)
        x = 1.0 + it / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # quantize from the integer position so a boundary never falls a whole stair short
            pos_in_cycle = it % self.total_size
            if pos_in_cycle <= self.first_step_size:
                position = pos_in_cycle * stairs / self.first_step_size
            else:
                position = (self.total_size - pos_in_cycle) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [lo / (1 + self.decay_lr_rate * interval) for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [(hi[0] - (hi[0] - lo[0]) * scale, lo[1]) for lo, hi in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        interval = (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        factor = 1 + self.decay_mom_rate * interval
        return [(b0 * factor, b1) for b0, b1 in self.max_moms]

    def _apply_momentum(self) -> None:
        if self.cycle_momentum:
            for group, mom in zip(self.optimizer.param_groups, self.get_mom()):
                group["betas"] = mom

    def step(self, batch_iteration: int | None = None) -> None:
        super().step(batch_iteration)
        self._apply_momentum()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.last_batch_iteration >= 0:
            self._apply_momentum()


SCHEDULERS: dict[str, type] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
    "LRRangeTest": LRRangeTest,
}


def build_scheduler(name: str, params: dict[str, Any], optimizer: torch.optim.Optimizer) -> _Schedule:
    """The schedule `name` from the config's ``scheduler`` section; unknown names/params are errors."""
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise ConfigError(f"scheduler.type: unknown schedule '{name}'; choose one of {', '.join(SCHEDULERS)}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "optimizer")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"scheduler.params: unknown key(s) {unknown} for {name}; accepted: {', '.join(accepted)}"
        )
    try:
        return cls(optimizer, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scheduler ({name}): {exc}") from None
