"""Per-group weight ranges better than min/max: an error-minimizing clipping search, and the
learnable-range (LSQ / OmniQuant-style clipping) fake quantizer that LKD tunes.

Why clip: with 4 bits, a group's largest weight sets the step for all 64 of them; shrinking the range
clips a few outliers but rounds every other weight more finely. The search tries shrink ratios and
keeps, per group, the one with the smallest squared error, optionally weighted by the mean squared
input of each column (E[x_i^2] from calibration data), which is the output error a column's weight
error causes when inputs are uncorrelated.
"""
from __future__ import annotations

import torch

from .kernels import int_range

__all__ = ["search_clip_ranges", "fake_quantize_ranges"]


def _ranges(gmin: torch.Tensor, gmax: torch.Tensor, absmax: torch.Tensor, ratio: float, bits: int,
            symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    lo, hi = int_range(bits, symmetric)
    if symmetric:
        return absmax * ratio / hi, None
    scale = (gmax - gmin) * ratio / float(hi - lo)
    return scale, gmin * ratio - lo * scale


def fake_quantize_ranges(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """clamp(round((w - zero) / scale)) * scale + zero per group, differentiable in w, scale and zero.

    Rounding passes gradients straight through; clamping does not, so clipped weights push the
    range outwards and rounded ones move it by their rounding error (LSQ's gradient for the step).
    The arithmetic is the one `kernels.quantize_with_scales` stores, so freezing is exact.
    """
    lo, hi = int_range(bits, zero is None)
    groups = w.reshape(-1, group_size)
    s = scale.reshape(-1, 1).clamp_min(1e-10)
    shifted = groups if zero is None else groups - zero.reshape(-1, 1)
    v = shifted / s
    q = (v + (torch.round(v) - v).detach()).clamp(lo, hi) * s
    if zero is not None:
        q = q + zero.reshape(-1, 1)
    return q.reshape(w.shape)


@torch.no_grad()
def search_clip_ranges(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    column_weight: torch.Tensor | None = None,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group (scale, zero) of a [out, in] weight minimizing the (column-weighted) squared error.

    Ratios from 1.0 (plain min/max) down to `min_ratio` in `grid` steps; ratio 1.0 is always a
    candidate, so the result is never worse than round-to-nearest on the measured error.
    """
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    cw = torch.ones(in_f) if column_weight is None else column_weight.detach().float().clamp_min(0)
    cw = cw.reshape(1, in_f // group_size, group_size)
    gmin, gmax = g.amin(-1), g.amax(-1)
    absmax = g.abs().amax(-1)
    best_err = torch.full_like(absmax, float("inf"))
    best_s = torch.zeros_like(absmax)
    best_z = None if symmetric else torch.zeros_like(absmax)
    for i in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * i / max(grid - 1, 1)
        s, z = _ranges(gmin, gmax, absmax, ratio, bits, symmetric)
        deq = fake_quantize_ranges(g.reshape(out_f, in_f), s, z, bits, group_size).reshape(g.shape)
        err = ((deq - g) ** 2 * cw).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s.reshape(-1), None if best_z is None else best_z.reshape(-1)
