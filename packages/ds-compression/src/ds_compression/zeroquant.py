"""Post-training quantization: ZeroQuant (group-wise weights, token-wise activations, optional LKD).

`quantize()` never touches the model it is given: it validates everything first, then works on a copy.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterable

import torch
from torch import nn

from .history import record_method
from .lkd import layerwise_distill
from .model_utils import CompressionInputError, iter_linears, model_bytes, select_linears, set_module
from .quant.functional import check_bits
from .quant.modules import QuantLinear
from .quant.qat import FakeQuantLinear

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
    show_progress: bool = True,
) -> nn.Module:
    """A quantized copy of `model`: each selected nn.Linear becomes a `QuantLinear`.

    method: "zeroquant" (4/8-bit group-wise weights) or "xtc" (1/2-bit binary/ternary weights, plain
    rounding; see `ds_compression.xtc` for the distillation recipe). group_size=None is one group per
    output row. act_bits adds token-wise dynamic activation quantization (e.g. W8A8).
    lkd=True runs layer-by-layer distillation on `calib_batches` (token id tensors).
    """
    if method not in ("zeroquant", "xtc"):
        raise CompressionInputError(f"unknown quantization method {method!r}; use 'zeroquant' or 'xtc'")
    allowed = (4, 8) if method == "zeroquant" else (1, 2)
    exclude = tuple(exclude)
    validate_quantization(model, weight_bits, group_size, act_bits, modules, exclude, allowed)
    if lkd and not calib_batches:
        raise CompressionInputError("LKD needs calibration data: pass calib_batches (or --calib <text file>)")
    start = time.perf_counter()
    size_before = model_bytes(model)
    student = copy.deepcopy(model).eval()
    kwargs = dict(weight_bits=weight_bits, group_size=group_size, act_bits=act_bits, symmetric=symmetric)
    chosen_names = {n for n, _ in select_linears(student, modules, exclude)}
    lkd_report = None
    if lkd:
        prefix_of = {id(m): n for n, m in student.named_modules()}

        def make_trainable(local_name: str, linear: nn.Linear) -> nn.Module | None:
            return FakeQuantLinear(linear, **kwargs) if prefix_of.get(id(linear)) in chosen_names else None

        lkd_report = layerwise_distill(
            student,
            model,
            calib_batches,
            make_trainable=make_trainable,
            freeze=lambda m: m.to_quant_linear(),
            steps=lkd_steps,
            lr=lkd_lr,
            show_progress=show_progress,
        )
    for name, linear in list(iter_linears(student)):
        if name in chosen_names:
            set_module(student, name, QuantLinear.from_linear(linear, **kwargs))
    entry = {
        "method": method,
        **kwargs,
        "lkd": bool(lkd),
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
