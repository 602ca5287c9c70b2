"""Dtype names used in configs and checkpoints, and the model dtype a config asks for."""
from __future__ import annotations

import torch

__all__ = ["DTYPE_NAMES", "dtype_from_name", "model_dtype", "dtype_name"]

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name '{name}'; expected one of {', '.join(DTYPE_NAMES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return _NAMES[dtype]


def model_dtype(fp16: bool, bf16: bool) -> torch.dtype:
    if fp16:
        return torch.float16
    if bf16:
        return torch.bfloat16
    return torch.float32
