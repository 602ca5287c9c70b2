"""Turns compression techniques on and moves weight bit widths along their schedule, per step.

The ds-train engine calls `CompressionScheduler.step(global_step)` once per optimizer step (after
the step, with the new global step). Schedule semantics follow DeepSpeed's:
- every technique starts at its `schedule_offset`;
- weight bits start at `start_bits` and drop by 1 after `quantization_period` steps, the period
  doubling after each drop, until `target_bits` (MoQ's schedule).
"""
from __future__ import annotations

from typing import Any

from ds_core.logging import logger
from torch import nn

from .config import CompressionTrainingConfig
from .layers import CompressedLinear

__all__ = ["CompressionScheduler", "bits_at"]


def bits_at(step: int, offset: int, start_bits: int, target_bits: int, period: int) -> int | None:
    """Weight bit width at `step` (None before `offset`)."""
    if step < offset:
        return None
    elapsed, bits = step - offset, start_bits
    while bits > target_bits and elapsed >= period:
        elapsed -= period
        bits -= 1
        period *= 2
    return bits


class CompressionScheduler:
    def __init__(self, model: nn.Module, config: Any) -> None:
        from .api import section_from

        self.model = model
        self.config: CompressionTrainingConfig = section_from(config)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
        if not self.layers:
            raise ValueError("CompressionScheduler: the model has no CompressedLinear layers; call init_compression first")
        self.global_step = -1

    def step(self, global_step: int) -> dict[str, list[str]]:
        """Apply the schedule for `global_step`; returns {technique: [modules changed]}."""
        self.global_step = global_step
        cfg = self.config
        changed: dict[str, list[str]] = {}
        wq = cfg.weight_quantization.shared_parameters
        for name, layer in self.layers.items():
            q = layer.weight_quant
            if q is not None and wq.enabled:
                bits = bits_at(global_step, wq.schedule_offset, q["start_bits"], q["target_bits"], q["period"])
                if bits != layer.weight_bits:
                    layer.weight_bits = bits
                    changed.setdefault("weight_quantization", []).append(name)
                    if wq.quantize_verbose:
                        logger.info(f"compression: {name} weights now {bits}-bit at step {global_step}")
            aq = cfg.activation_quantization.shared_parameters
            if layer.act_quant is not None and aq.enabled and not layer.act_quant_enabled \
                    and global_step >= aq.schedule_offset:
                layer.act_quant_enabled = True
                changed.setdefault("activation_quantization", []).append(name)
            for kind, section in (("sparse", cfg.sparse_pruning), ("row", cfg.row_pruning),
                                  ("head", cfg.head_pruning)):
                spec = getattr(layer, kind)
                shared = section.shared_parameters
                if spec is not None and shared.enabled and not spec.get("enabled") \
                        and global_step >= shared.schedule_offset:
                    layer.enable_mask(kind)
                    changed.setdefault(f"{kind}_pruning", []).append(name)
        return changed
