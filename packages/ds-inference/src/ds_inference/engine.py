"""``init_inference``: wrap a transformers causal LM for inference (dtype, TP, kernels, quant, ZeRO)."""

from __future__ import annotations

from typing import Any

import torch
from ds_core import comm
from ds_core.accelerator import get_accelerator
from ds_core.config import parse_config
from ds_core.logging import log_dist
from torch import nn

from .config import InferenceConfig

__all__ = ["InferenceEngine", "init_inference"]


class InferenceEngine(nn.Module):
    """The prepared model: ``forward`` and ``generate`` behave like the original module's."""

    def __init__(self, model: nn.Module, config: InferenceConfig) -> None:
        super().__init__()
        self.config = config
        self.module = model.eval()
        self.report: dict[str, Any] = {}
        self._streamer = None
        for p in model.parameters():
            p.requires_grad_(False)
        if config.dtype is not None:
            model.to(config.dtype)
        tp = config.tensor_parallel
        if tp.enabled and tp.tp_size > 1:
            from .tp import auto_tensor_parallel

            self.report["tensor_parallel"] = auto_tensor_parallel(model, tp.tp_size)
        if config.replace_with_kernel_inject:
            from .inject import inject_kernels

            self.report["kernel_inject"] = inject_kernels(model)
        if config.quant.enabled and config.quant.weight.enabled:
            self._quantize(model)
        device = get_accelerator().device()
        if config.zero is not None:
            self._stream_layers(model, device)
        else:
            model.to(device)
        log_dist(f"init_inference: {type(model).__name__} {self.report}", ranks=[0])

    def _quantize(self, model: nn.Module) -> None:
        if self.config.zero is not None:
            raise ValueError("quant and zero (ZeRO-Inference) cannot be combined yet; choose one")
        from .quantize import quantize_linears
        from .tp import find_layer_list

        w = self.config.quant.weight
        n = sum(
            quantize_linears(layer, w.num_bits, w.group_size, w.q_type == "symmetric")
            for layer in find_layer_list(model)
        )
        self.report["quantized_linears"] = n

    def _stream_layers(self, model: nn.Module, device: torch.device) -> None:
        from .tp import find_layer_list
        from .zero_inference import LayerStreamer

        layers = find_layer_list(model)
        layer_params = {id(p) for layer in layers for p in layer.parameters()}
        for p in model.parameters():  # everything outside the layers stays resident
            if id(p) not in layer_params:
                p.data = p.data.to(device)
        for b in model.buffers():
            b.data = b.data.to(device)
        self._streamer = LayerStreamer(layers, self.config.zero.offload_param, device)
        self.report["zero_inference"] = {
            "layers": len(layers),
            "device": self.config.zero.offload_param.device,
            "resident_bytes": self._streamer.resident_bytes(),
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @torch.inference_mode()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.generate(*args, **kwargs)

    @property
    def streamer(self):
        return self._streamer


def init_inference(
    model: nn.Module, config: InferenceConfig | dict | str | None = None, **kwargs: Any
) -> InferenceEngine:
    """Prepare ``model`` for inference, like ``deepspeed.init_inference``.

    ``config`` is a dict/JSON path/``InferenceConfig``; keyword arguments are merged into it
    (``dtype=torch.float16, tensor_parallel={"tp_size": 2}, replace_with_kernel_inject=True,
    quant={"enabled": True, "weight": {"num_bits": 8}}, zero={"offload_param": {"device": "nvme",
    "nvme_path": "/mnt/nvme"}}``). With ``tp_size > 1`` call it on every rank after
    ``ds_core.comm.init_distributed()``, each rank holding the same weights.
    """
    if isinstance(config, InferenceConfig):
        if kwargs:
            raise ValueError(
                f"pass either an InferenceConfig or keyword arguments, not both: {sorted(kwargs)}"
            )
        cfg = config
    else:
        raw: dict = {}
        if config is not None:
            from ds_core.config import load_config_source

            raw = dict(load_config_source(config))
        overlap = set(raw) & set(kwargs)
        if overlap:
            raise ValueError(f"keys given both in config and as keyword arguments: {sorted(overlap)}")
        raw.update(kwargs)
        cfg = parse_config(InferenceConfig, raw)
    tp = cfg.tensor_parallel
    if tp.tp_size > 1 and not comm.is_initialized():
        raise RuntimeError(
            "tensor_parallel.tp_size > 1: call ds_core.comm.init_distributed() on every rank first"
        )
    return InferenceEngine(model, cfg)
