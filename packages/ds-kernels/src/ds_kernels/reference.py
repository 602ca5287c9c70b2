"""Plain-PyTorch twins of every compiled op: the fallback when the extension is missing and the test oracle.

Each function has exactly the semantics of its compiled counterpart (same argument names, same in-place
updates, same rounding of the low-precision copy), computed in fp32.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "adam_step",
    "adagrad_step",
    "lion_step",
    "quantize_groups",
    "dequantize_groups",
    "quantized_matmul",
    "pack_int4",
    "unpack_int4",
]


def _write_lowp(param: torch.Tensor, param_out_lowp: torch.Tensor | None) -> None:
    if param_out_lowp is not None:
        param_out_lowp.copy_(param.view_as(param_out_lowp))


@torch.no_grad()
def adam_step(
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
    """Adam (L2 weight decay added to the gradient) or AdamW (decoupled decay), DeepSpeed's formulas.
    bf16 states are updated in fp32 and rounded back once."""
    if exp_avg.dtype != torch.float32:
        m32, v32 = exp_avg.float(), exp_avg_sq.float()
        adam_step(
            param,
            grad,
            m32,
            v32,
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
        exp_avg.copy_(m32)
        exp_avg_sq.copy_(v32)
        return
    g = grad.float()
    if weight_decay != 0.0 and not adamw_mode:
        g = g + weight_decay * param
    exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    if bias_correction:
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
    else:
        bc1 = bc2 = 1.0
    denom = exp_avg_sq.sqrt().mul_(1.0 / math.sqrt(bc2)).add_(eps)
    if weight_decay != 0.0 and adamw_mode:
        param.mul_(1.0 - lr * weight_decay)
    param.addcdiv_(exp_avg, denom, value=-lr / bc1)
    _write_lowp(param, param_out_lowp)


@torch.no_grad()
def adagrad_step(
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
    """Adagrad as DeepSpeed's cpu_adagrad: L2 decay into the gradient, running sum of squares."""
    del step  # Adagrad has no bias correction; the argument keeps the three optimizers' calls alike.
    g = grad.float()
    if weight_decay != 0.0:
        g = g + weight_decay * param
    exp_avg_sq.addcmul_(g, g)
    param.addcdiv_(g, exp_avg_sq.sqrt().add_(eps), value=-lr)
    _write_lowp(param, param_out_lowp)


@torch.no_grad()
def lion_step(
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
    """Lion (Chen et al. 2023): sign of the interpolated momentum, decoupled weight decay."""
    del step
    g = grad.float()
    update = torch.sign(exp_avg * beta1 + g * (1.0 - beta1))
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update, alpha=-lr)
    exp_avg.mul_(beta2).add_(g, alpha=1.0 - beta2)
    _write_lowp(param, param_out_lowp)


def _qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of a stored value; stored values are signed in both modes."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return (-hi if symmetric else lo), hi


def quantize_groups(
    x: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise quantization along the last dim. Returns (q int8 unpacked, scale, zero_point).

    Symmetric: scale = absmax / qmax, q = round(x / scale) in [-qmax, qmax], x ~ q * scale.
    Asymmetric: scale = (max - min) / (2^bits - 1), q = round((x - min) / scale) - 2^(bits-1), stored
    signed so both widths share one layout; x ~ q * scale + zero_point with zero_point = min + 2^(bits-1) scale.
    """
    groups = x.reshape(-1, group_size).float()
    lo, hi = _qrange(bits, symmetric)
    if symmetric:
        scale = groups.abs().amax(dim=1) / hi
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.round(groups * inv[:, None]).clamp_(lo, hi)
        return q.to(torch.int8).reshape(x.shape), scale, None
    gmin, gmax = groups.amin(dim=1), groups.amax(dim=1)
    scale = (gmax - gmin) / float((1 << bits) - 1)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round((groups - gmin[:, None]) * inv[:, None]).clamp_(0, (1 << bits) - 1) + lo
    zero_point = gmin - lo * scale
    return q.to(torch.int8).reshape(x.shape), scale, zero_point


def dequantize_groups(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Inverse of quantize_groups on unpacked int8 values; fp32 result of q's shape."""
    groups = q.reshape(-1, group_size).float() * scale[:, None]
    if zero_point is not None:
        groups = groups + zero_point[:, None]
    return groups.reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte along the last dim: element 2i in the low nibble, 2i+1 in the high."""
    flat = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2).to(torch.int16) & 0xF
    return (flat[..., 0] | (flat[..., 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: sign-extended int8 values, last dim doubled."""
    b = packed.to(torch.int16)
    lo = b & 0xF
    hi = (b >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1)
    both = torch.where(both >= 8, both - 16, both)
    return both.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


def quantized_matmul(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ W.T for W = dequantize(q) of shape [out, in] (q unpacked int8), result in fp32."""
    w = dequantize_groups(q, scale, zero_point, group_size)
    out = x.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none") -> torch.Tensor:
    """gelu(x + bias) computed in fp32, returned in x's dtype."""
    v = x.float() if bias is None else x.float() + bias.float()
    return torch.nn.functional.gelu(v, approximate=approximate).to(x.dtype)
