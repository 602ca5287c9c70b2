"""ZeRO-Inference: decoder-layer weights live in host memory or on NVMe and stream in per layer.

Each decoder layer's parameters are packed into one flat byte buffer (one file per layer for NVMe).
A forward pre-hook makes the layer resident (waiting for its prefetch if one is in flight), points
the parameters at views of the resident buffer, and starts fetching the next layer into a free
buffer; the post-hook points the parameters back at their home (host views, or empty placeholders
for NVMe). ``buffer_count`` buffers exist in all, so at most that many layers are ever resident:
with NVMe the process holds ``buffer_count`` layers instead of all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from ds_core.accelerator import get_accelerator
from torch import nn

from .config import OffloadParamConfig

__all__ = ["LayerStreamer"]

_ALIGN = 4096  # keeps every layer buffer O_DIRECT-friendly and every view element-aligned


@dataclass
class _Slot:
    param: nn.Parameter
    offset: int
    nbytes: int
    shape: torch.Size
    dtype: torch.dtype


def _round_up(n: int, k: int = _ALIGN) -> int:
    return -(-n // k) * k


class LayerStreamer:
    """Installs the hooks on ``layers``; ``close()`` restores nothing (weights stay streamed)."""

    def __init__(self, layers: nn.ModuleList, cfg: OffloadParamConfig, device: torch.device) -> None:
        self.layers = layers
        self.cfg = cfg
        self.device = device
        self.acc = get_accelerator()
        self.to_device = device.type != "cpu"
        self.nvme = cfg.device == "nvme"
        if not self.nvme and not self.to_device:
            raise ValueError(
                "offload_param.device='cpu' with a CPU compute device keeps weights where they are; "
                "use device='nvme' (or run on an accelerator) for ZeRO-Inference"
            )
        self.slots: list[list[_Slot]] = []
        self.layer_bytes: list[int] = []
        self.home: list[torch.Tensor | None] = []  # host buffers (cpu mode)
        self.files: list[str] = []
        self._aio: Any = None
        if self.nvme:
            from ds_kernels.aio import AsyncIO

            os.makedirs(cfg.nvme_path, exist_ok=True)
            self._aio = AsyncIO()
        for i, layer in enumerate(layers):
            self._pack(i, layer)
        count = min(cfg.buffer_count, len(layers))
        size = max(self.layer_bytes)
        self._host_buffers = [self._host_empty(size) for _ in range(count)] if self.nvme else []
        self._dev_buffers = (
            [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(count)]
            if self.to_device
            else []
        )
        self._free = list(range(count))
        self._resident: dict[int, tuple[int, Any]] = {}  # layer -> (buffer index, pending request/event)
        self._stream = self.acc.Stream() if self.to_device else None
        self.fetches = 0
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_pre(i)))
            self._handles.append(layer.register_forward_hook(self._make_post(i)))

    # --- packing ----------------------------------------------------------------------------
    def _host_empty(self, nbytes: int) -> torch.Tensor:
        from ds_kernels.aio import aligned_empty

        return aligned_empty(nbytes, torch.uint8)

    def _pack(self, index: int, layer: nn.Module) -> None:
        slots, offset = [], 0
        seen: set[int] = set()
        for p in layer.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            slots.append(_Slot(p, offset, nbytes, p.shape, p.dtype))
            offset = _round_up(offset + nbytes, 64)
        total = _round_up(max(offset, 1))
        buf = self._host_empty(total) if self.nvme else torch.empty(total, dtype=torch.uint8)
        if not self.nvme and self.cfg.pin_memory:
            buf = self.acc.pin_memory(buf)
        for s in slots:
            buf[s.offset : s.offset + s.nbytes].copy_(
                s.param.data.detach().cpu().contiguous().view(-1).view(torch.uint8)
            )
        self.slots.append(slots)
        self.layer_bytes.append(total)
        if self.nvme:
            path = os.path.join(self.cfg.nvme_path, f"layer_{index:05d}.bin")
            tmp = path + ".tmp"
            self._aio.submit_write(buf, tmp).wait()
            os.replace(tmp, path)  # a crash never leaves a half-written layer under the final name
            self.files.append(path)
            self.home.append(None)
            for s in slots:
                s.param.data = torch.empty(0, dtype=s.dtype, device=self.device)
        else:
            self.home.append(buf)
            self._point(slots, buf)

    @staticmethod
    def _point(slots: list[_Slot], buf: torch.Tensor) -> None:
        for s in slots:
            s.param.data = buf[s.offset : s.offset + s.nbytes].view(s.dtype).view(s.shape)

    # --- streaming --------------------------------------------------------------------------
    def _fetch(self, index: int) -> None:
        """Start making layer ``index`` resident in a free buffer (no-op if resident or none free)."""
        if index in self._resident or not self._free:
            return
        b = self._free.pop(0)
        nbytes = self.layer_bytes[index]
        pending: Any = None
        if self.nvme:
            pending = self._aio.submit_read(self._host_buffers[b][:nbytes], self.files[index])
        if self.to_device:
            if pending is not None:
                pending.wait()
            src = self._host_buffers[b] if self.nvme else self.home[index]
            with self.acc.stream(self._stream):
                self._dev_buffers[b][:nbytes].copy_(src[:nbytes], non_blocking=True)
                event = self.acc.Event()
                event.record(self._stream)
            pending = event
        self._resident[index] = (b, pending)
        self.fetches += 1

    def _make_pre(self, index: int):
        def pre_hook(module: nn.Module, args: Any) -> None:
            self._fetch(index)
            b, pending = self._resident[index]
            if pending is not None:
                if self.to_device:
                    self.acc.current_stream().wait_event(pending)
                else:
                    pending.wait()
                self._resident[index] = (b, None)
            buf = self._dev_buffers[b] if self.to_device else self._host_buffers[b]
            self._point(self.slots[index], buf)
            self._fetch((index + 1) % len(self.layers))  # prefetch while this layer computes

        return pre_hook

    def _make_post(self, index: int):
        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            b, _ = self._resident.pop(index)
            if self.to_device:
                # the buffer may be refilled only after this layer's kernels are done with it
                self.acc.current_stream().synchronize()
            self._free.append(b)
            if self.nvme:
                for s in self.slots[index]:
                    s.param.data = torch.empty(0, dtype=s.dtype, device=self.device)
            else:
                self._point(self.slots[index], self.home[index])

        return post_hook

    def resident_bytes(self) -> int:
        """Bytes of layer weights held in memory by the streamer (buffers, plus host copies in cpu mode)."""
        held = sum(b.numel() for b in self._host_buffers) + sum(b.numel() for b in self._dev_buffers)
        return held + sum(h.numel() for h in self.home if h is not None)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self._aio is not None:
            self._aio.close()
