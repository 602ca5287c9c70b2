"""LAMB (You et al. 2019) with DeepSpeed FusedLamb's arguments: Adam direction, per-tensor trust ratio."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

__all__ = ["Lamb"]


class Lamb(torch.optim.Optimizer):
    """``p -= lr * clamp(|p| / |u|, min_coeff, max_coeff) * u`` with ``u = m_hat / (sqrt(v_hat) + eps) + wd * p``.

    The trust ratio is per model tensor. Where each rank holds whole tensors (ZeRO stage 0) every
    optimizer parameter is one model tensor. Under ZeRO 1/2 the optimizer parameters are pieces of a
    flat shard; `shard()` tells which runs of each piece belong to which model tensor, and the step
    sums the squared norms of every tensor's weight and update over all ranks before applying them.
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
        self._segments: dict[int, list[tuple[int, int, int]]] | None = None
        self._tensor_count = 0
        self._sum_over_ranks: Callable[[torch.Tensor], None] | None = None

    def shard(self, segments: dict[int, list[tuple[int, int, int]]], tensor_count: int,
              sum_over_ranks: Callable[[torch.Tensor], None]) -> None:
        """Sharded mode: `segments[id(p)]` lists (model tensor index, start, end) runs of optimizer
        parameter p (elements outside every run, i.e. padding, are not updated); `sum_over_ranks`
        all-reduces (sums) a tensor in place over the ranks that share the model tensors."""
        self._segments, self._tensor_count, self._sum_over_ranks = segments, tensor_count, sum_over_ranks

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self._segments is None:  # whole tensors: one at a time, so one update direction is alive
            for p, group in stepped:
                update = self._direction(p, group)
                coeff = self._trust_ratio(p.norm().item(), update.norm().item(), group)
                self.state[p]["lamb_coeff"] = coeff
                p.add_(update, alpha=-group["lr"] * coeff)
            return loss
        updates = [(p, group, self._direction(p, group)) for p, group in stepped]
        # sharded: squared norms of every model tensor's weight and update, summed over pieces and ranks
        sums = torch.zeros(self._tensor_count, 2, dtype=torch.float64)
        for p, _, update in updates:
            for t, lo, hi in self._segments[id(p)]:
                sums[t, 0] += p[lo:hi].double().square().sum()
                sums[t, 1] += update[lo:hi].double().square().sum()
        self._sum_over_ranks(sums)
        norms = sums.sqrt().tolist()
        for p, group, update in updates:
            for t, lo, hi in self._segments[id(p)]:
                coeff = self._trust_ratio(norms[t][0], norms[t][1], group)
                p[lo:hi].add_(update[lo:hi], alpha=-group["lr"] * coeff)
        return loss

    def _direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance p's Adam moments with its gradient; the update direction (before the trust ratio)."""
        beta1, beta2 = group["betas"]
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
        return update

    @staticmethod
    def _trust_ratio(w_norm: float, u_norm: float, group: dict) -> float:
        if w_norm > 0 and u_norm > 0:
            return min(max(w_norm / u_norm, group["min_coeff"]), group["max_coeff"])
        return 1.0
