"""Layer-by-layer knowledge distillation (ZeroQuant's LKD) with memory bounded by one block.

For block k: its input X is the output of the already-quantized blocks 0..k-1 on the calibration
set; the teacher is the original block k, the student its fake-quantized copy; the student's weights
are tuned to minimize MSE(student(X), teacher(X)), then frozen to their quantized form and X moves
on to the next block. Only one block's inputs/outputs are held at a time, and gradients exist only
for the block being tuned. Stand-ins may also expose learnable quantization ranges
(`range_parameters()`), trained in the same loop at their own learning rate.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .model_utils import find_block_list, set_module
from .progress import progress_bar

__all__ = ["capture_block_inputs", "run_block", "layerwise_distill"]


class _StopForward(Exception):
    pass


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]
) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, other keyword inputs) reaching the first block, one entry per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "past_key_value")}
        rest["use_cache"] = False
        captured.append((hidden.detach(), rest))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False) if _takes_use_cache(model) else model(input_ids=batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _takes_use_cache(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "use_cache")


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def layerwise_distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[torch.Tensor],
    make_trainable: Callable[[str, nn.Linear], nn.Module | None],
    freeze: Callable[[nn.Module], nn.Module],
    steps: int = 100,
    lr: float = 1e-5,
    show_progress: bool = True,
    range_lr: float | None = None,
) -> dict[str, Any]:
    """Distill each block of `student` (a deep copy of `teacher`) in turn; returns per-block losses.

    `make_trainable(name, linear)` returns the fake-quantized stand-in for a linear (or None to keep
    it); `freeze(stand_in)` turns a tuned stand-in into its final inference module. Parameters a
    stand-in lists in `range_parameters()` (learned quantization ranges) train at `range_lr`.
    """
    _, s_blocks = find_block_list(student)
    _, t_blocks = find_block_list(teacher)
    inputs = capture_block_inputs(student, s_blocks, batches)
    report: dict[str, Any] = {"block_loss_before": [], "block_loss_after": []}
    bar = progress_bar(total=len(s_blocks) * max(steps, 1), desc="LKD", disable=not show_progress)
    for k, (s_block, t_block) in enumerate(zip(s_blocks, t_blocks)):
        with torch.no_grad():
            targets = [run_block(t_block, h, kw) for h, kw in inputs]
        stand_ins = {}
        for name, mod in list(s_block.named_modules()):
            if type(mod) is nn.Linear:
                new = make_trainable(name, mod)
                if new is not None:
                    set_module(s_block, name, new)
                    stand_ins[name] = new
        ranges = [p for m in stand_ins.values() for p in getattr(m, "range_parameters", list)()]
        params = [p for m in stand_ins.values() for p in m.parameters() if all(p is not r for r in ranges)]
        for p in s_block.parameters():
            p.requires_grad_(False)
        for p in params + ranges:
            p.requires_grad_(True)
        before = _block_mse(s_block, inputs, targets)
        if params and steps > 0:
            groups = [{"params": params, "lr": lr}]
            if ranges:
                groups.append({"params": ranges, "lr": lr if range_lr is None else range_lr})
            opt = torch.optim.Adam(groups)
            for step in range(steps):
                hidden, kw = inputs[step % len(inputs)]
                loss = nn.functional.mse_loss(run_block(s_block, hidden, kw), targets[step % len(inputs)])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(block=k, loss=f"{loss.item():.3g}", refresh=False)
            del opt
        else:
            bar.update(max(steps, 1))
        for name, mod in stand_ins.items():
            set_module(s_block, name, freeze(mod))
        for p in s_block.parameters():
            p.requires_grad_(False)
        report["block_loss_before"].append(before)
        report["block_loss_after"].append(_block_mse(s_block, inputs, targets))
        with torch.no_grad():
            inputs = [(run_block(s_block, h, kw), kw) for h, kw in inputs]
        del targets
    bar.close()
    return report


def _block_mse(block: nn.Module, inputs: list, targets: list) -> float:
    with torch.no_grad():
        total = sum(nn.functional.mse_loss(run_block(block, h, kw), t).item() for (h, kw), t in zip(inputs, targets))
    return total / max(len(inputs), 1)

