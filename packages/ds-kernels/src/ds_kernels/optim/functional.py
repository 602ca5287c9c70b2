"""In-place CPU optimizer steps over flat fp32 master parameters (the ZeRO-Offload shape).

Each step reads the gradient in fp32, bf16 or fp16, updates the fp32 parameter and its states in one
pass, and can write the updated parameter as bf16/fp16 into a second buffer for the copy back to the
device. The compiled kernel is used when available, else the reference after one warning.
"""

from __future__ import annotations

import math

import torch

from ds_kernels import _loader, reference
from ds_kernels._checks import check_host_tensor, dtype_code, ptr

__all__ = ["available", "cpu_adam_step", "cpu_adagrad_step", "cpu_lion_step"]

_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOWP_DTYPES = (torch.bfloat16, torch.float16)


def available() -> bool:
    """True when the compiled CPU optimizer kernels are loaded."""
    ext = _loader.extension()
    return ext is not None and hasattr(ext, "adam_step")


def _check_common(
    param: torch.Tensor,
    grad: torch.Tensor,
    states: dict,
    out: torch.Tensor | None,
    state_dtypes: tuple = (torch.float32,),
) -> None:
    check_host_tensor("param", param, (torch.float32,))
    n = param.numel()
    check_host_tensor("grad", grad, _GRAD_DTYPES, n)
    for name, state in states.items():
        check_host_tensor(name, state, state_dtypes, n)
    dtypes = {state.dtype for state in states.values()}
    if len(dtypes) > 1:
        raise TypeError(f"optimizer states must share one dtype, got {sorted(str(d) for d in dtypes)}")
    if out is not None:
        check_host_tensor("param_out_lowp", out, _LOWP_DTYPES, n)


def _check_step(step: int) -> None:
    if int(step) < 1:
        raise ValueError(f"step must be >= 1 (the count including this update), got {step}")


def cpu_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adamw_mode: bool = True,
    bias_correction: bool = True,
    param_out_lowp: torch.Tensor | None = None,
) -> None:
    """One Adam/AdamW update in place (see `reference.adam_step` for the formulas).

    The states may be fp32 or bf16 (both the same): bf16 states halve their memory and traffic; the
    math stays fp32 and the new states are rounded to nearest even."""
    _check_common(
        param,
        grad,
        {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        param_out_lowp,
        (torch.float32, torch.bfloat16),
    )
    _check_step(step)
    if not available():
        _loader.fallback_warning("cpu_adam")
        reference.adam_step(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            adamw_mode=adamw_mode,
            bias_correction=bias_correction,
            param_out_lowp=param_out_lowp,
        )
        return
    bc1 = 1.0 - beta1**step if bias_correction else 1.0
    bc2 = 1.0 - beta2**step if bias_correction else 1.0
    _loader.extension().adam_step(
        ptr(param),
        ptr(grad),
        dtype_code(grad),
        ptr(exp_avg),
        ptr(exp_avg_sq),
        dtype_code(exp_avg),
        ptr(param_out_lowp),
        dtype_code(param_out_lowp),
        param.numel(),
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(adamw_mode),
        float(lr / bc1),
        float(1.0 / math.sqrt(bc2)),
        _loader.num_threads(),
    )


def cpu_adagrad_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    eps: float,
    weight_decay: float,
    param_out_lowp: torch.Tensor | None = None,
) -> None:
    """One Adagrad update in place (see `reference.adagrad_step`)."""
    _check_common(param, grad, {"exp_avg_sq": exp_avg_sq}, param_out_lowp)
    _check_step(step)
    if not available():
        _loader.fallback_warning("cpu_adagrad")
        reference.adagrad_step(
            param,
            grad,
            exp_avg_sq,
            step=step,
            lr=lr,
            eps=eps,
            weight_decay=weight_decay,
            param_out_lowp=param_out_lowp,
        )
        return
    _loader.extension().adagrad_step(
        ptr(param),
        ptr(grad),
        dtype_code(grad),
        ptr(exp_avg_sq),
        ptr(param_out_lowp),
        dtype_code(param_out_lowp),
        param.numel(),
        float(lr),
        float(eps),
        float(weight_decay),
        _loader.num_threads(),
    )


def cpu_lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    param_out_lowp: torch.Tensor | None = None,
) -> None:
    """One Lion update in place (see `reference.lion_step`)."""
    _check_common(param, grad, {"exp_avg": exp_avg}, param_out_lowp)
    _check_step(step)
    if not available():
        _loader.fallback_warning("cpu_lion")
        reference.lion_step(
            param,
            grad,
            exp_avg,
            step=step,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            param_out_lowp=param_out_lowp,
        )
        return
    _loader.extension().lion_step(
        ptr(param),
        ptr(grad),
        dtype_code(grad),
        ptr(exp_avg),
        ptr(param_out_lowp),
        dtype_code(param_out_lowp),
        param.numel(),
        float(lr),
        float(beta1),
        float(beta2),
        float(weight_decay),
        _loader.num_threads(),
    )
