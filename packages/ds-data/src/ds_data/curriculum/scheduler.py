"""Curriculum difficulty schedules: fixed_linear, fixed_root, fixed_discrete and custom.

Formulas follow DeepSpeed's curriculum scheduler so a config gives the same difficulty per step:
``fixed_root``: d = floor((step / total) ** (1 / root_degree) * (max - min) + min), rounded down to a
multiple of difficulty_step, capped at max; ``fixed_linear`` is fixed_root with root_degree 1;
``fixed_discrete``: difficulty[i] while step <= max_step[i], the last difficulty afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ds_data.config import CurriculumLegacyConfig, CurriculumMetricConfig

__all__ = ["CurriculumScheduler"]

Number = int | float


class CurriculumScheduler:
    """Maps a global step to a difficulty; `update_difficulty(step)` advances and returns it."""

    def __init__(self, config: CurriculumLegacyConfig | CurriculumMetricConfig, integer: bool = True) -> None:
        self.min_difficulty = config.min_difficulty
        self.max_difficulty = config.max_difficulty
        self.schedule_type = config.schedule_type
        self.schedule = config.schedule_config
        # sequence lengths and value thresholds of integer metrics are whole numbers
        self.integer = integer
        self.current_difficulty: Number = self._cast(self.min_difficulty)
        self._custom: Callable[[int], Number] | None = None

    def _cast(self, value: float) -> Number:
        return int(value) if self.integer else float(value)

    def set_custom_get_difficulty(self, fn: Callable[[int], Number]) -> None:
        """The function step -> difficulty used by schedule_type 'custom'."""
        if self.schedule_type != "custom":
            raise ValueError(
                f"set_custom_get_difficulty needs schedule_type 'custom', this one is '{self.schedule_type}'"
            )
        self._custom = fn

    def get_difficulty(self, global_step: int) -> Number:
        """The difficulty at `global_step` (pure: does not change the state)."""
        if self.schedule_type == "fixed_discrete":
            for difficulty, last in zip(self.schedule.difficulty, self.schedule.max_step):
                if global_step <= last:
                    return self._cast(difficulty)
            return self._cast(self.schedule.difficulty[-1])
        if self.schedule_type == "custom":
            if self._custom is None:
                raise RuntimeError(
                    "schedule_type is 'custom' but no function was set: call set_custom_get_difficulty(fn) first"
                )
            return self._cast(self._custom(global_step))
        root = 1.0 if self.schedule_type == "fixed_linear" else float(self.schedule.root_degree)
        progress = min(max(float(global_step), 0.0) / self.schedule.total_curriculum_step, 1.0) ** (
            1.0 / root
        )
        value = math.floor(progress * (self.max_difficulty - self.min_difficulty) + self.min_difficulty)
        value -= value % self.schedule.difficulty_step
        # rounding down to a multiple of difficulty_step must not go below the starting difficulty
        # (DeepSpeed would return 0 for min=5, step=8; a zero-length batch helps nobody)
        value = max(value, self.min_difficulty)
        return self._cast(min(value, self.max_difficulty))

    def update_difficulty(self, global_step: int) -> Number:
        self.current_difficulty = self.get_difficulty(global_step)
        return self.current_difficulty

    def get_current_difficulty(self) -> Number:
        return self.current_difficulty

    def state_dict(self) -> dict[str, Any]:
        return {"current_difficulty": self.current_difficulty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "current_difficulty" not in state:
            raise KeyError(f"curriculum scheduler state has no 'current_difficulty' (keys: {sorted(state)})")
        self.current_difficulty = state["current_difficulty"]
