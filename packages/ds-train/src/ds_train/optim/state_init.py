"""Create an optimizer's per-parameter state up front instead of at its first step.

torch's Adam/AdamW (and most optimizers) allocate their state lazily, at the first `step()`: after the
first forward and backward, so the largest long-lived tensors of training land in the holes the
freed activations left in the host heap, which then cannot hold the next step's activations and the
heap grows (measured: +45 MiB peak RSS per rank for a 20M-parameter GPT-2, bf16, stage 0). DeepSpeed
creates the state at initialize for the same reason. The state made here is exactly what the lazy
path would make (zeros, step 0), so training is unchanged.
"""
from __future__ import annotations

import torch

__all__ = ["materialize_state"]


def _adam_step_dtype(fused: bool) -> torch.dtype:
    # torch keeps `step` in the default float dtype, except fused kernels which want fp32
    return torch.float32 if fused or torch.get_default_dtype() != torch.float64 else torch.float64


def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the state of every parameter of `optimizer` that has none yet. Supported: torch's Adam
    and AdamW, and optimizers that offer `materialize_state()` (ds-kernels' CPU optimizers); others keep
    their lazy initialization."""
    own = getattr(optimizer, "materialize_state", None)
    if callable(own):
        own()
        return
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        device_step = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            if device_step:
                state["step"] = torch.zeros((), dtype=_adam_step_dtype(True), device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=_adam_step_dtype(False))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
