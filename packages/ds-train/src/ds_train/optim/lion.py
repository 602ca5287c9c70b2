"""Lion (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from ds_kernels.reference import lion_step

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    """``p = p * (1 - lr * wd) - lr * sign(b1 * m + (1 - b1) * g)``; then ``m = b2 * m + (1 - b2) * g``."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                # the same formula as ds-kernels' CPU Lion, from its PyTorch reference (any device)
                lion_step(p, grad, state["exp_avg"], step=state["step"], lr=group["lr"], beta1=beta1,
                          beta2=beta2, weight_decay=group["weight_decay"])
        return loss
