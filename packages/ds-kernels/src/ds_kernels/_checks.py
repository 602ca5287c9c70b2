"""Argument checks shared by the op wrappers: one clear error before any raw pointer is handed to C++."""

from __future__ import annotations

from collections.abc import Iterable

import torch

# Codes the C++ side understands for an element type; keep in sync with csrc/cpu/common.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
NO_TENSOR = -1


def check_host_tensor(
    name: str,
    t: torch.Tensor,
    dtypes: Iterable[torch.dtype],
    numel: int | None = None,
) -> None:
    """A contiguous CPU tensor of an allowed dtype (and of `numel` elements when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    allowed = tuple(dtypes)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"{name}: dtype {str(t.dtype).replace('torch.', '')} not supported (expected {names})"
        )
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous() on the flat buffer)")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: has {t.numel()} elements, expected {numel} (same as param)")


def dtype_code(t: torch.Tensor | None) -> int:
    return NO_TENSOR if t is None else DTYPE_CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
