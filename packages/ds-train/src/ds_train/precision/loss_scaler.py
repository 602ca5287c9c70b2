"""Loss scaling for fp16 with DeepSpeed's dynamic rule (window, hysteresis, min scale).

Dynamic rule: on an overflow, spend one unit of hysteresis; when none is left, halve the scale (not
below ``min_loss_scale``). After ``loss_scale_window`` overflow-free iterations since the last
overflow, double the scale and refill the hysteresis. With ``consecutive_hysteresis`` the budget is
refilled after every clean iteration instead.
"""
from __future__ import annotations

from typing import Any

__all__ = ["LossScaler", "StaticLossScaler", "DynamicLossScaler", "build_loss_scaler"]


class LossScaler:
    """Scale 1, never overflows: used for fp32 and bf16."""

    dynamic = False

    def __init__(self, scale: float = 1.0) -> None:
        self.cur_scale = float(scale)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"cur_scale": self.cur_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cur_scale = float(state["cur_scale"])


class StaticLossScaler(LossScaler):
    """A fixed scale (``fp16.loss_scale > 0``); overflowing steps are still skipped."""


class DynamicLossScaler(LossScaler):
    dynamic = True

    def __init__(
        self,
        init_scale: float = 2.0**16,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1.0,
        delayed_shift: int = 2,
        consecutive_hysteresis: bool = False,
    ) -> None:
        super().__init__(init_scale)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_scale = float(min_scale)
        self.delayed_shift = int(delayed_shift)
        self.cur_hysteresis = int(delayed_shift)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.cur_iter = 0
        self.last_overflow_iter = -1

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "cur_scale": self.cur_scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cur_scale = float(state["cur_scale"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.cur_hysteresis = int(state["cur_hysteresis"])


def build_loss_scaler(fp16_config: Any) -> LossScaler:
    """The scaler for a `FP16Config` section (or scale 1 when fp16 is off)."""
    if fp16_config is None or fp16_config.enabled is not True:
        return LossScaler(1.0)
    if fp16_config.loss_scale > 0:
        return StaticLossScaler(fp16_config.loss_scale)
    return DynamicLossScaler(
        init_scale=2.0**fp16_config.initial_scale_power,
        scale_window=fp16_config.loss_scale_window,
        min_scale=fp16_config.min_loss_scale,
        delayed_shift=fp16_config.hysteresis,
        consecutive_hysteresis=fp16_config.consecutive_hysteresis,
    )
