"""The accelerator interface: every device-specific call in the project goes through one of these."""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class Accelerator(abc.ABC):
    """One device family (CPU, CUDA/ROCm, XPU, MPS) behind a single interface.

    Code outside `ds_core.accelerator` never names a device family; it asks this object.
    """

    #: short name used in device strings ("cpu", "cuda", "xpu", "mps")
    name: str = ""

    # -- presence and devices -------------------------------------------------------------------
    @abc.abstractmethod
    def is_available(self) -> bool: ...

    @abc.abstractmethod
    def device_count(self) -> int: ...

    @abc.abstractmethod
    def current_device(self) -> int: ...

    @abc.abstractmethod
    def set_device(self, index: int) -> None: ...

    def device_name(self, index: int | None = None) -> str:
        """Device string such as ``cuda:1``; without an index, the family name."""
        return self.name if index is None else f"{self.name}:{index}"

    def current_device_name(self) -> str:
        return self.device_name(self.current_device())

    def device(self, index: int | None = None) -> torch.device:
        return torch.device(self.device_name(index))

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == self.name

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    # -- synchronization, streams and events ------------------------------------------------------
    @abc.abstractmethod
    def synchronize(self, index: int | None = None) -> None: ...

    @abc.abstractmethod
    def Stream(self, **kwargs: Any) -> Any: ...  # noqa: N802 - mirrors torch.cuda.Stream

    @abc.abstractmethod
    def Event(self, enable_timing: bool = False, **kwargs: Any) -> Any: ...  # noqa: N802

    @abc.abstractmethod
    def current_stream(self) -> Any: ...

    @abc.abstractmethod
    def default_stream(self) -> Any: ...

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[None]:
        """Run the body on `stream` (no-op for devices without streams)."""
        yield

    # -- memory -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def memory_allocated(self, index: int | None = None) -> int: ...

    @abc.abstractmethod
    def max_memory_allocated(self, index: int | None = None) -> int: ...

    @abc.abstractmethod
    def reset_peak_memory_stats(self, index: int | None = None) -> None: ...

    def memory_reserved(self, index: int | None = None) -> int:
        return self.memory_allocated(index)

    @abc.abstractmethod
    def total_memory(self, index: int | None = None) -> int: ...

    def empty_cache(self) -> None:
        return None

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked copy of a host tensor where the device benefits from it, else the tensor itself."""
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned() if self.pin_memory_supported() else False

    def pin_memory_supported(self) -> bool:
        return False

    # -- dtypes and communication -------------------------------------------------------------------
    @abc.abstractmethod
    def is_bf16_supported(self) -> bool: ...

    @abc.abstractmethod
    def is_fp16_supported(self) -> bool: ...

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = [torch.float32]
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        if self.is_fp16_supported():
            dtypes.append(torch.float16)
        return dtypes

    @abc.abstractmethod
    def communication_backend_name(self) -> str:
        """torch.distributed backend for this device family (nccl, xccl, gloo, ...)."""

    def describe(self) -> str:
        """One line for reports and logs."""
        return f"{self.name} ({self.device_count()} device(s))"

    def __repr__(self) -> str:
        return f"<Accelerator {self.name}>"
