"""Build the optimizer named in the config over the engine's master parameters.

DeepSpeed facts kept here: ``Adam`` is AdamW (decoupled weight decay) unless ``adam_w_mode`` is false;
``torch_adam`` picks torch's implementation (always the case here); with ``offload_optimizer: cpu``
Adam/AdamW, Adagrad and Lion run ds-kernels' CPU kernels (DeepSpeedCPUAdam's role).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from ds_core.accelerator import get_accelerator
from ds_core.config import ConfigError

from ds_train.optim.lamb import Lamb
from ds_train.optim.lion import Lion

__all__ = ["OPTIMIZER_NAMES", "ELEMENTWISE_OPTIMIZERS", "build_optimizer", "is_elementwise"]

OPTIMIZER_NAMES = ("adam", "adamw", "lamb", "sgd", "adagrad", "lion")

#: optimizers whose update of an element depends only on that element: a flat shard is equivalent
ELEMENTWISE_OPTIMIZERS = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, Lion,
)

_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "bias_correction", "amsgrad", "adam_w_mode", "torch_adam",
              "fused", "foreach"}


def is_elementwise(optimizer: torch.optim.Optimizer) -> bool:
    if isinstance(optimizer, ELEMENTWISE_OPTIMIZERS):
        return True
    try:
        from ds_kernels.optim import DSCPUAdagrad, DSCPUAdam, DSCPULion
    except ImportError:  # pragma: no cover - ds-kernels is a declared dependency
        return False
    return isinstance(optimizer, (DSCPUAdam, DSCPUAdagrad, DSCPULion))


def _check_keys(name: str, params: dict[str, Any], accepted: set[str]) -> None:
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(
            f"optimizer.params: unknown key(s) {unknown} for {name}; accepted: {', '.join(sorted(accepted))}"
        )


def _signature_keys(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")}


def _adam(name: str, params: dict[str, Any], groups: list[dict], offload: bool) -> torch.optim.Optimizer:
    _check_keys(name, params, _ADAM_KEYS)
    p = dict(params)
    adamw = bool(p.pop("adam_w_mode", True)) if name == "adam" else True
    p.pop("torch_adam", None)  # ours is always a torch (or ds-kernels) implementation
    fused = p.pop("fused", None)
    foreach = p.pop("foreach", None)
    if "betas" in p:
        p["betas"] = tuple(p["betas"])
    bias_correction = bool(p.pop("bias_correction", True))
    if offload:
        if p.pop("amsgrad", False):
            raise ConfigError("optimizer.params.amsgrad=true is not supported with offload_optimizer")
        from ds_kernels.optim import DSCPUAdam

        return DSCPUAdam(groups, adamw_mode=adamw, bias_correction=bias_correction, **p)
    if not bias_correction:
        raise ConfigError("optimizer.params.bias_correction=false needs offload_optimizer (the CPU Adam kernel)")
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    p.setdefault("weight_decay", 0.0)  # DeepSpeed's Adam default (torch's AdamW would use 0.01)
    if fused is None and foreach is None:
        # torch's fused kernel (CPU and CUDA) is several times faster than foreach on a flat shard and
        # makes no parameter-sized temporaries
        first = groups[0]["params"][0]
        fused = first.device.type in ("cpu", get_accelerator().name) and first.dtype == torch.float32
    if fused:
        return cls(groups, fused=True, **p)
    return cls(groups, foreach=True if foreach is None else bool(foreach), **p)


def build_optimizer(
    type_name: str, params: dict[str, Any], param_groups: list[dict], offload: bool = False
) -> torch.optim.Optimizer:
    """The optimizer `type_name` (case-insensitive) over `param_groups` with config `params`.

    `offload=True` means the parameters are fp32 host tensors and the CPU kernels are preferred.
    """
    name = type_name.lower()
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"optimizer.type: '{type_name}' is not supported; choose one of Adam, AdamW, Lamb, SGD, Adagrad, Lion "
            "(or pass a torch optimizer to initialize(optimizer=...))"
        )
    try:
        if name in ("adam", "adamw"):
            return _adam(name, params, param_groups, offload)
        if name == "lamb":
            _check_keys("Lamb", params, _signature_keys(Lamb))
            p = dict(params)
            if "betas" in p:
                p["betas"] = tuple(p["betas"])
            return Lamb(param_groups, **p)
        if name == "sgd":
            _check_keys("SGD", params, {"lr", "momentum", "dampening", "weight_decay", "nesterov"})
            return torch.optim.SGD(param_groups, **params)
        if name == "adagrad":
            if offload:
                from ds_kernels.optim import DSCPUAdagrad

                _check_keys("Adagrad", params, _signature_keys(DSCPUAdagrad))
                return DSCPUAdagrad(param_groups, **params)
            _check_keys("Adagrad", params, {"lr", "eps", "weight_decay", "lr_decay", "initial_accumulator_value"})
            return torch.optim.Adagrad(param_groups, **params)
        # lion
        p = dict(params)
        if "betas" in p:
            p["betas"] = tuple(p["betas"])
        if offload:
            from ds_kernels.optim import DSCPULion

            _check_keys("Lion", p, _signature_keys(DSCPULion))
            return DSCPULion(param_groups, **p)
        _check_keys("Lion", p, _signature_keys(Lion))
        return Lion(param_groups, **p)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"optimizer ({type_name}): {exc}") from None
