"""The one door to the device: `get_accelerator()`.

Chosen by what is present (CUDA/ROCm, then XPU, then MPS, then CPU) or by ``DS_ACCELERATOR``.
"""
from __future__ import annotations

import os

from ds_core.accelerator.base import Accelerator
from ds_core.accelerator.cpu import CPUAccelerator, host_peak_rss_bytes, host_rss_bytes
from ds_core.accelerator.device import TorchDeviceAccelerator

__all__ = [
    "Accelerator",
    "AcceleratorError",
    "get_accelerator",
    "set_accelerator",
    "known_accelerators",
    "host_rss_bytes",
    "host_peak_rss_bytes",
]

ENV_VAR = "DS_ACCELERATOR"


class AcceleratorError(RuntimeError):
    """An accelerator was asked for by name but is unknown or absent."""


def _factories() -> dict[str, Accelerator]:
    return {
        "cuda": TorchDeviceAccelerator("cuda", "nccl"),
        "xpu": TorchDeviceAccelerator("xpu", "xccl"),
        "mps": TorchDeviceAccelerator("mps", "gloo"),
        "cpu": CPUAccelerator(),
    }


def known_accelerators() -> list[str]:
    return list(_factories())


_current: Accelerator | None = None


def _choose(name: str | None) -> Accelerator:
    options = _factories()
    if name:
        key = name.strip().lower()
        if key in ("rocm", "hip"):
            key = "cuda"  # the HIP build of torch serves ROCm devices through torch.cuda
        if key not in options:
            raise AcceleratorError(
                f"{ENV_VAR}={name!r} is not a known accelerator; choose one of {', '.join(options)}"
            )
        acc = options[key]
        if not acc.is_available():
            raise AcceleratorError(
                f"{ENV_VAR}={name!r} was requested but no {key} device is available to torch "
                f"{__import__('torch').__version__}; unset {ENV_VAR} or set it to 'cpu'"
            )
        return acc
    for key in ("cuda", "xpu", "mps"):
        if options[key].is_available():
            return options[key]
    return options["cpu"]


def get_accelerator() -> Accelerator:
    """The accelerator for this process (chosen once, then cached)."""
    global _current
    if _current is None:
        _current = _choose(os.environ.get(ENV_VAR))
    return _current


def set_accelerator(name_or_accelerator: str | Accelerator | None) -> Accelerator:
    """Override the choice (tests, or a launcher that knows better). ``None`` re-detects."""
    global _current
    if isinstance(name_or_accelerator, Accelerator):
        _current = name_or_accelerator
    else:
        _current = _choose(name_or_accelerator)
    return _current
