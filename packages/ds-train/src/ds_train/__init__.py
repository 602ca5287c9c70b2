"""ds_train: the training engine (ZeRO 0-3, offload, mixed precision, checkpoints), DeepSpeed-compatible API.

    import ds_train as deepspeed
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config="ds_config.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()

Names are imported on first use, so `ds-train-launch` (ds_train.launcher) starts without importing
torch or the engine.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "initialize": "ds_train.api",
    "init_distributed": "ds_train.api",
    "add_config_arguments": "ds_train.api",
    "DeepSpeedEngine": "ds_train.engine",
    "TrainConfig": "ds_train.config",
    "load_train_config": "ds_train.config",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:  # submodules, as DeepSpeed scripts use them: deepspeed.zero.Init, deepspeed.checkpoint
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'ds_train' has no attribute '{name}'") from None
