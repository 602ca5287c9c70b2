"""What `DeepSpeedEngine` builds before its first step: parameter groups, the optimizer factory handed
to the ZeRO strategy, the LR scheduler and the run's length.

Each helper checks the arguments of `ds_train.initialize` against the config (one optimizer, one
scheduler; an optimizer that sharding keeps exact) and fails with an error naming what to change.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import torch
from ds_core import comm
from ds_core.config import ConfigError

from ds_train.config import TrainConfig
from ds_train.optim import Lamb, build_optimizer, is_elementwise
from ds_train.schedulers import build_scheduler

__all__ = [
    "OptimizerArg", "broadcast_non_flat", "build_lr_scheduler", "check_optimizer_shardable", "optimizer_factory",
    "param_groups", "training_length",
]

OptimizerArg = Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer], None]  # noqa: UP007 - runtime alias, py39


def _rebind_client_optimizer(client: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Point a user's optimizer at the engine's master parameters, keeping its class and hyperparameters."""
    client.param_groups = []
    client.state.clear()
    for g in groups:
        client.add_param_group(g)
    return client


def param_groups(model: torch.nn.Module, optimizer: OptimizerArg, model_parameters: Any) -> list[dict]:
    """The trainable parameter groups: the client optimizer's, else `model_parameters` (tensors, groups or
    named_parameters()), else the whole model; frozen and repeated parameters left out."""
    if isinstance(optimizer, torch.optim.Optimizer):
        raw = [dict(g) for g in optimizer.param_groups]
    elif model_parameters is not None:
        items = list(model_parameters)
        if items and isinstance(items[0], dict):
            raw = [dict(g) for g in items]
        elif items and isinstance(items[0], tuple):  # named_parameters()
            raw = [{"params": [p for _, p in items]}]
        else:
            raw = [{"params": items}]
    else:
        raw = [{"params": list(model.parameters())}]
    seen: set[int] = set()
    groups = []
    for g in raw:
        params = []
        for p in g["params"]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if params:
            groups.append({**g, "params": params})
    if not groups:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
    return groups


def optimizer_factory(config: TrainConfig, optimizer: OptimizerArg, offload: bool) -> tuple[Callable, bool]:
    """(groups -> optimizer, whether it is elementwise) from the client's optimizer or the config's section."""
    cfg = config.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        if cfg is not None:
            raise ConfigError("an optimizer was passed to initialize() and the config has an 'optimizer' section; "
                              "give only one")
        if offload and config.zero_force_ds_cpu_optimizer:
            from ds_kernels.optim import DSCPUAdagrad, DSCPUAdam, DSCPULion

            if not isinstance(optimizer, (DSCPUAdam, DSCPUAdagrad, DSCPULion)):
                raise ConfigError(
                    "offload_optimizer=cpu with a client optimizer needs a ds-kernels CPU optimizer "
                    "(ds_kernels.optim.DSCPUAdam/DSCPUAdagrad/DSCPULion), or set zero_force_ds_cpu_optimizer=false"
                )
        return (lambda groups: _rebind_client_optimizer(optimizer, groups)), is_elementwise(optimizer)
    if callable(optimizer):
        # unknown class: stage 0 keeps whole tensors (always exact); stage >= 1 checks after building
        return optimizer, config.zero_stage >= 1
    if cfg is None:
        raise ConfigError("no optimizer: add an 'optimizer' section to the config or pass optimizer= to initialize()")
    if cfg.legacy_fusion:
        raise ConfigError("optimizer.legacy_fusion=true is not supported")
    elementwise = cfg.type.lower() != "lamb"
    return (lambda groups: build_optimizer(cfg.type, cfg.params, groups, offload=offload)), elementwise


def check_optimizer_shardable(config: TrainConfig, optimizer: OptimizerArg, elementwise: bool) -> None:
    """ZeRO >= 1 steps the optimizer on flat shards: refuse one whose update would change by it."""
    stage = config.zero_optimization.stage
    # Lamb's per-tensor trust ratio is made exact at stages 1/2 (norms summed over shards, optim/lamb.py)
    lamb = isinstance(optimizer, Lamb) or (optimizer is None and config.optimizer is not None
                                            and config.optimizer.type.lower() == "lamb")
    if stage >= 1 and not elementwise and not (lamb and stage in (1, 2)) and not config.zero_allow_untested_optimizer:
        raise ConfigError(
            f"ZeRO stage {stage} shards the optimizer over flat buffers, which is exact only for "
            "elementwise optimizers (Adam, AdamW, SGD, Adagrad, Lion) and, at stages 1 and 2, Lamb; this "
            "optimizer is not. Use a lower stage, or set zero_allow_untested_optimizer=true to accept it."
        )


def broadcast_non_flat(model: torch.nn.Module, dp_world_size: int) -> None:
    """Frozen parameters and buffers start equal on every rank, as the trainable ones do (ZeRO-3's
    partitioned frozen parameters are already consistent: their pieces were cut from one source)."""
    if dp_world_size == 1:
        return
    for t in list(model.buffers()) + [p for p in model.parameters() if not p.requires_grad and not hasattr(p, "ds3")]:
        comm.broadcast(t.data, 0)


def build_lr_scheduler(config: TrainConfig, lr_scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The client's scheduler (an object, or a callable taking the optimizer), else the config's, else None."""
    cfg = config.scheduler
    if lr_scheduler is not None and cfg is not None:
        raise ConfigError("an lr_scheduler was passed to initialize() and the config has a 'scheduler' section; "
                          "give only one")
    if lr_scheduler is not None:
        return lr_scheduler(optimizer) if callable(lr_scheduler) and not hasattr(lr_scheduler, "step") \
            else lr_scheduler
    if cfg is not None:
        return build_scheduler(cfg.type, cfg.params, optimizer)
    return None


def training_length(config: TrainConfig, train_iters: int | None) -> int | None:
    """Optimizer steps of the whole run: given, or the LR schedule's ``total_num_steps`` (WarmupDecayLR,
    WarmupCosineLR); None when neither says (ds-data then asks for total_layer_tokens)."""
    if train_iters is not None:
        if int(train_iters) < 1:
            raise ValueError(f"train_iters={train_iters}: the training length must be at least 1 step")
        return int(train_iters)
    total = config.scheduler.params.get("total_num_steps") if config.scheduler is not None else None
    return int(total) if total is not None and not isinstance(total, str) else None
