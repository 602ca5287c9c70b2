"""Quantizers used in forward passes: token-wise dynamic activations, 1/2-bit (XTC) weights, and
straight-through fake quantization for training (LKD, QAT, XTC distillation).

Straight-through estimator (STE): the forward uses the quantized value, the backward treats the
rounding as identity, written as ``w + (q(w) - w).detach()``.
"""
from __future__ import annotations

import torch

from . import kernels

__all__ = [
    "quantize_activation_tokenwise",
    "binary_weight",
    "ternary_weight",
    "fake_quantize_weight",
    "check_bits",
]

WEIGHT_BITS = (1, 2, 4, 8)


def check_bits(bits: int, allowed: tuple[int, ...], what: str) -> None:
    if not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{what}: bits must be one of {list(allowed)}, got {bits!r}")


def quantize_activation_tokenwise(x: torch.Tensor, bits: int, symmetric: bool = True) -> torch.Tensor:
    """ZeroQuant's token-wise dynamic quantization: one range per token (last dim), computed on the fly.

    Returns the dequantized (fake-quantized) tensor with a straight-through gradient.
    """
    xf = x.float()
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qmax
        q = torch.round(xf / scale).clamp(-qmax, qmax) * scale
    else:
        levels = (1 << bits) - 1
        lo = xf.amin(dim=-1, keepdim=True)
        scale = (xf.amax(dim=-1, keepdim=True) - lo).clamp_min(1e-8) / levels
        q = torch.round((xf - lo) / scale).clamp(0, levels) * scale + lo
    q = q.to(x.dtype)
    return x + (q - x).detach() if x.requires_grad else q


def binary_weight(w: torch.Tensor) -> torch.Tensor:
    """1-bit weights (XTC/BinaryBERT): sign(w) times the mean |w| of its row."""
    alpha = w.abs().mean(dim=1, keepdim=True)
    return torch.where(w >= 0, alpha, -alpha)


def ternary_weight(w: torch.Tensor) -> torch.Tensor:
    """2-bit ternary weights (TWN, as in XTC): {-a, 0, +a} per row, threshold 0.7 * mean |w|,
    a = mean |w| over the entries above the threshold."""
    absw = w.abs()
    delta = 0.7 * absw.mean(dim=1, keepdim=True)
    mask = (absw > delta).to(w.dtype)
    alpha = (absw * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    return torch.sign(w) * mask * alpha


def quantize_dequantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> torch.Tensor:
    """The weight after a round trip through the stored format (no gradient)."""
    with torch.no_grad():
        if bits == 1:
            return binary_weight(w)
        if bits == 2:
            return ternary_weight(w)
        return kernels.dequantize(kernels.quantize(w, bits, group_size, symmetric), dtype=w.dtype)


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> torch.Tensor:
    """Quantized forward value with a straight-through gradient to the full-precision weight."""
    return w + (quantize_dequantize(w, bits, group_size, symmetric) - w).detach()


def fake_quantize_flat_groups(
    w: torch.Tensor, bits: int, num_groups: int = 1, symmetric: bool = True
) -> torch.Tensor:
    """QAT weight quantizer with DeepSpeed's grouping: the flattened tensor split into `num_groups`
    equal groups, any width from 1 to 16 bits (1: binary, 2: ternary, as in XTC); straight-through."""
    if w.numel() % num_groups:
        raise ValueError(f"quantize_groups={num_groups} does not divide the weight's {w.numel()} elements")
    with torch.no_grad():
        g = w.detach().float().reshape(num_groups, -1)
        if bits == 1:
            q = binary_weight(g)
        elif bits == 2:
            q = ternary_weight(g)
        elif symmetric:
            qmax = (1 << (bits - 1)) - 1
            scale = g.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
            q = torch.round(g / scale).clamp(-qmax, qmax) * scale
        else:
            levels = (1 << bits) - 1
            lo = g.amin(dim=1, keepdim=True)
            scale = (g.amax(dim=1, keepdim=True) - lo).clamp_min(1e-12) / levels
            q = torch.round((g - lo) / scale).clamp(0, levels) * scale + lo
        q = q.reshape(w.shape).to(w.dtype)
    return w + (q - w).detach()


def quantize_activation_tensorwise(x: torch.Tensor, bits: int, symmetric: bool = True) -> torch.Tensor:
    """Dynamic per-tensor activation fake quantization (DeepSpeed's `range_calibration: dynamic`)."""
    flat = x.reshape(1, -1)
    return fake_quantize_flat_groups(flat, bits, 1, symmetric).reshape(x.shape) if bits > 2 else x
