"""torch.optim.Optimizer classes over the CPU kernels (DeepSpeedCPUAdam / CPUAdagrad / CPULion shaped).

Parameters must be fp32 CPU tensors (the master copy). `step(lowp_params_out=...)` also writes each
updated parameter into a bf16/fp16 buffer, the one that is copied back to the device in ZeRO-Offload.
State dicts are the standard torch layout: state[i] = {'step': int, 'exp_avg': ..., 'exp_avg_sq': ...}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from ds_kernels.optim.functional import cpu_adagrad_step, cpu_adam_step, cpu_lion_step

__all__ = ["DSCPUAdam", "DSCPUAdagrad", "DSCPULion"]


class _CPUOptimizer(torch.optim.Optimizer):
    _state_names: tuple[str, ...] = ()

    def _flat_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _lowp_targets(self, lowp_params_out: Sequence | None) -> dict[int, torch.Tensor | None]:
        params = self._flat_params()
        if lowp_params_out is None:
            return {}
        outs = list(lowp_params_out)
        if outs and isinstance(outs[0], (list, tuple)):  # DeepSpeed's per-group list of lists
            outs = [t for group_outs in outs for t in group_outs]
        if len(outs) != len(params):
            raise ValueError(
                f"lowp_params_out has {len(outs)} tensors but the optimizer holds {len(params)} parameters"
            )
        return {id(p): o for p, o in zip(params, outs)}

    _state_dtype: torch.dtype = torch.float32

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name in self._state_names:
                state[name] = torch.zeros_like(
                    p, dtype=self._state_dtype, memory_format=torch.contiguous_format
                )
        return state

    def materialize_state(self) -> None:
        """Create every parameter's state now rather than at the first step (DeepSpeed does this at
        initialize: the long-lived state then sits below the first step's temporaries in the heap)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded states to the param dtype (fp32); restore the configured state dtype.
        for state in self.state.values():
            for name in self._state_names:
                if name in state and state[name].dtype != self._state_dtype:
                    state[name] = state[name].to(self._state_dtype)

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, out: torch.Tensor | None
    ) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(
        self, closure: Callable[[], float] | None = None, lowp_params_out: Sequence | None = None
    ) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        outs = self._lowp_targets(lowp_params_out)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                where = f"param_groups[{gi}]['params'][{pi}]"
                if p.dtype != torch.float32 or p.device.type != "cpu":
                    raise TypeError(
                        f"{type(self).__name__}: {where} must be an fp32 CPU tensor, "
                        f"got {p.dtype} on {p.device}"
                    )
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__}: {where} has a sparse gradient (not supported)")
                if not p.is_contiguous():
                    raise ValueError(f"{type(self).__name__}: {where} must be contiguous")
                state = self._init_state(p)
                state["step"] += 1
                out = outs.get(id(p))
                self._update(
                    p.view(-1),
                    p.grad.contiguous().view(-1),
                    state,
                    group,
                    None if out is None else out.view(-1),
                )
        return loss


def _check_range(name: str, value: float, lo: float, hi: float | None = None) -> None:
    if value < lo or (hi is not None and value >= hi):
        bound = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
        raise ValueError(f"invalid {name}: {value} (must be {bound})")


class DSCPUAdam(_CPUOptimizer):
    """Adam/AdamW on CPU with the fused SIMD kernel (DeepSpeedCPUAdam's arguments and defaults).

    `state_dtype=torch.bfloat16` keeps exp_avg/exp_avg_sq in bf16: 8 fewer bytes per parameter in
    memory and per step in traffic (see tools/bench/bench_cpu_adam.py for speed and loss curves)."""

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adamw_mode: bool = True,
        bias_correction: bool = True,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        self._state_dtype = state_dtype
        _check_range("lr", lr, 0.0)
        _check_range("eps", eps, 0.0)
        _check_range("betas[0]", betas[0], 0.0, 1.0)
        _check_range("betas[1]", betas[1], 0.0, 1.0)
        _check_range("weight_decay", weight_decay, 0.0)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            adamw_mode=adamw_mode,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)

    def _update(self, p, grad, state, group, out):
        cpu_adam_step(
            p,
            grad,
            state["exp_avg"].view(-1),
            state["exp_avg_sq"].view(-1),
            step=state["step"],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            adamw_mode=group["adamw_mode"],
            bias_correction=group["bias_correction"],
            param_out_lowp=out,
        )


class DSCPUAdagrad(_CPUOptimizer):
    """Adagrad on CPU (DeepSpeedCPUAdagrad's arguments: lr=1e-2, eps=1e-10, weight_decay=0)."""

    _state_names = ("exp_avg_sq",)

    def __init__(
        self, params: Iterable, lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0
    ) -> None:
        _check_range("lr", lr, 0.0)
        _check_range("eps", eps, 0.0)
        _check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def _update(self, p, grad, state, group, out):
        cpu_adagrad_step(
            p,
            grad,
            state["exp_avg_sq"].view(-1),
            step=state["step"],
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            param_out_lowp=out,
        )


class DSCPULion(_CPUOptimizer):
    """Lion on CPU (DeepSpeedCPULion's arguments: lr=1e-3, betas=(0.9, 0.999), weight_decay=0)."""

    _state_names = ("exp_avg",)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ) -> None:
        _check_range("lr", lr, 0.0)
        _check_range("betas[0]", betas[0], 0.0, 1.0)
        _check_range("betas[1]", betas[1], 0.0, 1.0)
        _check_range("weight_decay", weight_decay, 0.0)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    def _update(self, p, grad, state, group, out):
        cpu_lion_step(
            p,
            grad,
            state["exp_avg"].view(-1),
            step=state["step"],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            param_out_lowp=out,
        )
