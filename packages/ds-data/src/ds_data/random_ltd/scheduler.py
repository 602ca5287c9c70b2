"""How many tokens the random-LTD layers keep at each step, and how many layer-tokens were consumed.

Same formula as DeepSpeed (fixed_linear): keep = floor(step / require_steps * (max - min) + min),
rounded down to a multiple of seq_per_step, capped at max. A layer-token is one token through one
layer: a step consumes ``global_batch_size * (keep * ltd_layers + max * (total_layers - ltd_layers))``.
"""

from __future__ import annotations

import math
from typing import Any

from ds_data.config import RandomLTDConfig

__all__ = ["RandomLTDScheduler"]


class RandomLTDScheduler:
    def __init__(self, config: RandomLTDConfig, global_batch_size: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        sched = config.random_ltd_schedule
        self.min_value = sched.min_value
        self.max_value = sched.max_value
        self.require_steps = sched.schedule_config.require_steps
        self.seq_per_step = sched.schedule_config.seq_per_step
        self.total_layer_num = config.total_layer_num
        self.ltd_layer_num = config.random_ltd_layer_num
        self.global_batch_size = global_batch_size
        self.current_value = self.min_value
        self.consumed_layer_tokens = 0
        self.current_step = -1

    def get_value(self, global_step: int) -> int:
        progress = min(max(float(global_step), 0.0) / self.require_steps, 1.0)
        value = math.floor(progress * (self.max_value - self.min_value) + self.min_value)
        value -= value % self.seq_per_step
        return int(min(max(value, self.min_value), self.max_value))

    def layer_tokens_at(self, value: int) -> int:
        """Layer-tokens one step consumes when the dropping layers keep `value` tokens."""
        full_layers = self.total_layer_num - self.ltd_layer_num
        return self.global_batch_size * (value * self.ltd_layer_num + self.max_value * full_layers)

    def update_seq(self, global_step: int) -> int:
        """Set the kept-token count for `global_step`; count the step's layer-tokens once per step."""
        self.current_value = self.get_value(global_step)
        if global_step != self.current_step:
            self.consumed_layer_tokens += self.layer_tokens_at(self.current_value)
            self.current_step = global_step
        return self.current_value

    def get_total_layer_tokens(self, train_iters: int) -> int:
        """Layer-tokens a whole run of `train_iters` steps consumes (pure: the state is unchanged)."""
        return sum(self.layer_tokens_at(self.get_value(step)) for step in range(train_iters))

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_layer_tokens": self.consumed_layer_tokens,
            "current_steps": self.current_step,
            "current_value": self.current_value,
            "min_value": self.min_value,
            "max_value": self.max_value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("consumed_layer_tokens", "current_steps", "current_value") if k not in state]
        if missing:
            raise KeyError(f"random-LTD scheduler state lacks {', '.join(missing)}")
        self.consumed_layer_tokens = int(state["consumed_layer_tokens"])
        self.current_step = int(state["current_steps"])
        self.current_value = int(state["current_value"])
