"""DeepSpeed's top-level functions: `initialize`, `init_distributed`, `add_config_arguments`."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import torch
from ds_core import comm
from ds_core.config import ConfigError, load_config_source

from ds_train.config import TrainConfig, load_train_config
from ds_train.engine import DeepSpeedEngine

__all__ = ["initialize", "init_distributed", "add_config_arguments"]


def init_distributed(dist_backend: str | None = None, timeout: Any = None, init_method: str | None = None,
                     rank: int = -1, world_size: int = -1, **_ignored_compat: Any) -> None:
    """Initialize torch.distributed through ds_core.comm (torchrun / SLURM / MPI environments)."""
    if _ignored_compat:
        unknown = ", ".join(sorted(_ignored_compat))
        raise TypeError(f"init_distributed: unsupported argument(s): {unknown}")
    if not comm.is_initialized():
        comm.init_distributed(dist_backend=dist_backend, timeout=timeout, init_method=init_method,
                              rank=rank, world_size=world_size)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's ``--deepspeed``, ``--deepspeed_config`` and ``--local_rank`` arguments."""
    group = parser.add_argument_group("DeepSpeed", "ds_train configuration")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="enable the ds_train engine (accepted for DeepSpeed compatibility)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="ds_train / DeepSpeed JSON config")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    if not any(a.dest == "local_rank" for a in parser._actions):
        group.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                           help="local rank passed by launchers")
    return parser


def _wants_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1 \
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int | None = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable | None = None,
    config: Any = None,
    config_params: Any = None,
    mesh_param: Any = None,
) -> tuple[DeepSpeedEngine, torch.optim.Optimizer, Any, Any]:
    """Build the engine; returns ``(engine, optimizer, training_dataloader, lr_scheduler)`` as DeepSpeed.

    `config` is a dict, a JSON file path or string, or a `TrainConfig`; ``args.deepspeed_config``
    is used when `config` is None.
    """
    if model is None:
        raise ValueError("initialize() needs model=")
    if mpu is not None or mesh_param is not None:
        raise ValueError("initialize(mpu=/mesh_param=): model parallelism is not supported yet")
    if config is not None and config_params is not None:
        raise ValueError("give config= or config_params=, not both")
    config = config if config is not None else config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if config is None:
        raise ConfigError("no config: pass config= (dict or JSON path) or args.deepspeed_config")
    raw = config.model_dump() if isinstance(config, TrainConfig) else load_config_source(config)
    parsed = config.model_copy(deep=True) if isinstance(config, TrainConfig) else load_train_config(raw)
    if dist_init_required is None:
        dist_init_required = _wants_distributed()
    if dist_init_required and not comm.is_initialized():
        init_distributed()
    engine = DeepSpeedEngine(model, parsed, raw, optimizer=optimizer, model_parameters=model_parameters,
                             training_data=training_data, lr_scheduler=lr_scheduler, collate_fn=collate_fn,
                             train_iters=getattr(args, "train_iters", None))
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
