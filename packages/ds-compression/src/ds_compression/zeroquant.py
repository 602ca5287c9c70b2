"""Post-training quantization: ZeroQuant (group-wise weights, token-wise activations, optional LKD).

`quantize()` never touches the model it is given: it validates everything first, then works on a copy.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
from torch import nn

from .calibration import observe_linear_inputs
from .history import record_method
from .lkd import layerwise_distill
from .model_utils import CompressionInputError, iter_linears, model_bytes, select_linears, set_module
from .quant.clipping import search_clip_ranges
from .quant.functional import check_bits
from .quant.modules import QuantLinear
from .quant.qat import FakeQuantLinear
from .smoothquant import smooth_activations

__all__ = ["quantize", "validate_quantization"]

DEFAULT_EXCLUDE = ("lm_head",)


def validate_quantization(
    model: nn.Module,
    weight_bits: int,
    group_size: int | None,
    act_bits: int | None,
    modules: Iterable[str] | None,
    exclude: Iterable[str],
    allowed_bits: tuple[int, ...] = (4, 8),
) -> list[tuple[str, nn.Linear]]:
    check_bits(weight_bits, allowed_bits, "weight quantization")
    if act_bits is not None:
        check_bits(act_bits, (4, 8), "activation quantization")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise CompressionInputError(f"group size must be a positive integer, got {group_size!r}")
    chosen = select_linears(model, modules, exclude)
    if group_size is not None and weight_bits in (4, 8):
        bad = [f"{n} (in_features={m.in_features})" for n, m in chosen if m.in_features % group_size]
        if bad:
            raise CompressionInputError(
                f"group size {group_size} does not divide the input dimension of {len(bad)} layer(s): "
                f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
            )
    return chosen


def quantize(
    model: nn.Module,
    *,
    method: str = "zeroquant",
    weight_bits: int = 8,
    group_size: int | None = None,
    act_bits: int | None = None,
    symmetric: bool = True,
    modules: Iterable[str] | None = None,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    lkd: bool = False,
    calib_batches: list[torch.Tensor] | None = None,
    lkd_steps: int = 10,
    lkd_lr: float = 3e-4,
    act_symmetric: bool = True,
    smooth_alpha: float | None = None,
    clip_search: bool = False,
    lkd_learn_ranges: bool = False,
    lkd_range_lr: float = 1e-2,
    show_progress: bool = True,
) -> nn.Module:
    """A quantized copy of `model`: each selected nn.Linear becomes a `QuantLinear`.

    method: "zeroquant" (4/8-bit group-wise weights) or "xtc" (1/2-bit binary/ternary weights, plain
    rounding; see `ds_compression.xtc` for the distillation recipe). group_size=None is one group per
    output row. act_bits adds token-wise dynamic activation quantization (e.g. W8A8).
    lkd=True runs layer-by-layer distillation on `calib_batches` (token id tensors).
    act_symmetric=False: token-wise activation ranges are [min, max] instead of [-absmax, absmax].
    smooth_alpha: SmoothQuant migration strength (e.g. 0.5), folded into the preceding norms/linears
    from `calib_batches` statistics; needs act_bits (it only matters for quantized activations).
    clip_search: each 4/8-bit weight group gets the clipping range with the least squared error
    (weighted by the mean squared input per column when `calib_batches` are given) instead of min/max.
    lkd_learn_ranges: LKD also trains each group's range (log-scale, and zero when asymmetric) at
    `lkd_range_lr` (a relative step for the scales).
    """
    if method not in ("zeroquant", "xtc"):
        raise CompressionInputError(f"unknown quantization method {method!r}; use 'zeroquant' or 'xtc'")
    allowed = (4, 8) if method == "zeroquant" else (1, 2)
    exclude = tuple(exclude)
    validate_quantization(model, weight_bits, group_size, act_bits, modules, exclude, allowed)
    if lkd and not calib_batches:
        raise CompressionInputError("LKD needs calibration data: pass calib_batches (or --calib <text file>)")
    if smooth_alpha is not None:
        if act_bits is None:
            raise CompressionInputError("smooth_alpha (SmoothQuant) needs act_bits: it only helps quantized activations")
        if not calib_batches:
            raise CompressionInputError("smooth_alpha (SmoothQuant) needs calibration data: pass calib_batches (or --calib)")
        if not 0.0 <= smooth_alpha <= 1.0:
            raise CompressionInputError(f"smooth_alpha must be in [0, 1], got {smooth_alpha!r}")
    if not act_symmetric and act_bits is None:
        raise CompressionInputError("act_symmetric=False needs act_bits (activations are not quantized otherwise)")
    if (clip_search or lkd_learn_ranges) and method != "zeroquant":
        raise CompressionInputError("clip_search / lkd_learn_ranges apply to 4/8-bit zeroquant weights only")
    if lkd_learn_ranges and not lkd:
        raise CompressionInputError("lkd_learn_ranges needs lkd=True")
    start = time.perf_counter()
    size_before = model_bytes(model)
    student = copy.deepcopy(model).eval()
    kwargs = dict(weight_bits=weight_bits, group_size=group_size, act_bits=act_bits, symmetric=symmetric,
                  act_symmetric=act_symmetric)
    chosen_names = {n for n, _ in select_linears(student, modules, exclude)}
    smoothed: list[str] = []
    if smooth_alpha is not None:
        smoothed = smooth_activations(student, calib_batches, smooth_alpha, only=chosen_names)
    ranges: dict[str, tuple] = {}
    if clip_search or lkd_learn_ranges:
        ranges = _initial_ranges(student, chosen_names, weight_bits, group_size, symmetric,
                                 calib_batches if clip_search else None, search=clip_search)
    lkd_report = None
    if lkd:
        prefix_of = {id(m): n for n, m in student.named_modules()}

        def make_trainable(local_name: str, linear: nn.Linear) -> nn.Module | None:
            name = prefix_of.get(id(linear))
            if name not in chosen_names:
                return None
            return FakeQuantLinear(linear, **kwargs, ranges=ranges.get(name), learn_ranges=lkd_learn_ranges)

        lkd_report = layerwise_distill(
            student,
            model,
            calib_batches,
            make_trainable=make_trainable,
            freeze=lambda m: m.to_quant_linear(),
            steps=lkd_steps,
            lr=lkd_lr,
            range_lr=lkd_range_lr,
            show_progress=show_progress,
        )
    for name, linear in list(iter_linears(student)):
        if name in chosen_names:
            set_module(student, name, QuantLinear.from_linear(linear, **kwargs, ranges=ranges.get(name)))
    entry = {
        "method": method,
        **kwargs,
        "smooth_alpha": smooth_alpha,
        "smoothed_layers": len(smoothed),
        "clip_search": bool(clip_search),
        "lkd": bool(lkd),
        "lkd_learn_ranges": bool(lkd_learn_ranges),
        **({"lkd_steps": lkd_steps, "lkd_lr": lkd_lr} if lkd else {}),
        **({"lkd_range_lr": lkd_range_lr} if lkd_learn_ranges else {}),
        "layers": len(chosen_names),
        "exclude": list(exclude),
        "seconds": round(time.perf_counter() - start, 2),
        "bytes_before": size_before,
        "bytes_after": model_bytes(student),
    }
    if lkd_report:
        entry["lkd_block_mse_before"] = [float(f"{v:.4g}") for v in lkd_report["block_loss_before"]]
        entry["lkd_block_mse_after"] = [float(f"{v:.4g}") for v in lkd_report["block_loss_after"]]
    record_method(student, entry)
    return student


def _column_mean_square(model: nn.Module, names: set[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """E[x_i^2] of each selected linear's input channels over the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0) + (x * x).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    linears = {n: m for n, m in iter_linears(model) if n in names}
    observe_linear_inputs(model, linears, batches, observe)
    return {n: sums[n] / counts[n] for n in sums}


def _initial_ranges(
    model: nn.Module, names: set[str], bits: int, group_size: int | None, symmetric: bool,
    batches: list[torch.Tensor] | None, search: bool,
) -> dict[str, tuple]:
    """Per-layer (scale, zero) per group: the clipping search's choice, or plain min/max."""
    col = _column_mean_square(model, names, batches) if batches else {}
    out = {}
    for name, linear in iter_linears(model):
        if name in names:
            g = group_size or linear.in_features
            out[name] = search_clip_ranges(linear.weight, bits, g, symmetric, col.get(name), grid=20 if search else 1)
    return out
