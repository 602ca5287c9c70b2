"""LAMB (You et al. 2019) with DeepSpeed FusedLamb's arguments: Adam direction, per-tensor trust ratio."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """``p -= lr * clamp(|p| / |u|, min_coeff, max_coeff) * u`` with ``u = m_hat / (sqrt(v_hat) + eps) + wd * p``.

    The trust ratio is per tensor, so LAMB needs whole parameters: ds-train runs it only where each
    rank holds whole tensors (ZeRO stage 0).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
    ) -> None:
        if amsgrad:
            raise ValueError("Lamb: amsgrad=True is not supported")
        if max_grad_norm:
            raise ValueError("Lamb: max_grad_norm is not supported; use the config's gradient_clipping")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        eps_inside_sqrt=eps_inside_sqrt, weight_decay=weight_decay,
                        max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)

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
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat = m / (1 - beta1 ** state["step"])
                    v_hat = v / (1 - beta2 ** state["step"])
                else:
                    m_hat, v_hat = m, v
                if group["eps_inside_sqrt"]:
                    update = m_hat / (v_hat + group["eps"]).sqrt()
                else:
                    update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm = p.norm().item()
                u_norm = update.norm().item()
                coeff = 1.0
                if w_norm > 0 and u_norm > 0:
                    coeff = min(max(w_norm / u_norm, group["min_coeff"]), group["max_coeff"])
                state["lamb_coeff"] = coeff
                p.add_(update, alpha=-group["lr"] * coeff)
        return loss
