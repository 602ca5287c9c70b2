"""CUDA, ROCm (the HIP build of torch answers to ``torch.cuda``), XPU and MPS over torch's device modules."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ds_core.accelerator.base import Accelerator


class TorchDeviceAccelerator(Accelerator):
    """A device family that torch exposes as a module (`torch.cuda`, `torch.xpu`, `torch.mps`)."""

    def __init__(self, name: str, backend: str) -> None:
        self.name = name
        self._backend = backend
        self._mod = getattr(torch, name, None)

    # presence and devices
    def is_available(self) -> bool:
        return self._mod is not None and bool(self._mod.is_available())

    def device_count(self) -> int:
        return int(self._mod.device_count()) if self.is_available() else 0

    def current_device(self) -> int:
        return int(self._mod.current_device()) if hasattr(self._mod, "current_device") else 0

    def set_device(self, index: int) -> None:
        if hasattr(self._mod, "set_device"):
            self._mod.set_device(index)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        if hasattr(self._mod, "manual_seed_all"):
            self._mod.manual_seed_all(seed)

    @property
    def is_rocm(self) -> bool:
        return self.name == "cuda" and getattr(torch.version, "hip", None) is not None

    # synchronization
    def synchronize(self, index: int | None = None) -> None:
        if index is None:
            self._mod.synchronize()
        else:
            self._mod.synchronize(index)

    def Stream(self, **kwargs: Any) -> Any:  # noqa: N802
        return self._mod.Stream(**kwargs)

    def Event(self, enable_timing: bool = False, **kwargs: Any) -> Any:  # noqa: N802
        return self._mod.Event(enable_timing=enable_timing, **kwargs)

    def current_stream(self) -> Any:
        return self._mod.current_stream()

    def default_stream(self) -> Any:
        return self._mod.default_stream()

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[None]:
        with self._mod.stream(stream):
            yield

    # memory
    def memory_allocated(self, index: int | None = None) -> int:
        return int(self._mod.memory_allocated(index)) if hasattr(self._mod, "memory_allocated") else 0

    def max_memory_allocated(self, index: int | None = None) -> int:
        if hasattr(self._mod, "max_memory_allocated"):
            return int(self._mod.max_memory_allocated(index))
        return self.memory_allocated(index)

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        if hasattr(self._mod, "reset_peak_memory_stats"):
            self._mod.reset_peak_memory_stats(index)

    def memory_reserved(self, index: int | None = None) -> int:
        if hasattr(self._mod, "memory_reserved"):
            return int(self._mod.memory_reserved(index))
        return self.memory_allocated(index)

    def total_memory(self, index: int | None = None) -> int:
        if hasattr(self._mod, "get_device_properties"):
            return int(self._mod.get_device_properties(index or 0).total_memory)
        return 0

    def empty_cache(self) -> None:
        if hasattr(self._mod, "empty_cache"):
            self._mod.empty_cache()

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.pin_memory_supported() else tensor

    def pin_memory_supported(self) -> bool:
        return self.name in ("cuda", "xpu")

    # dtypes and communication
    def is_bf16_supported(self) -> bool:
        fn = getattr(self._mod, "is_bf16_supported", None)
        return bool(fn()) if fn is not None else self.name != "mps"

    def is_fp16_supported(self) -> bool:
        return True

    def communication_backend_name(self) -> str:
        return self._backend

    def describe(self) -> str:
        if not self.is_available():
            return f"{self.name} (unavailable)"
        props = self._mod.get_device_properties(0) if hasattr(self._mod, "get_device_properties") else None
        label = "rocm" if self.is_rocm else self.name
        model = getattr(props, "name", "?")
        return f"{label} ({self.device_count()} x {model})"
