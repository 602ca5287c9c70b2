"""ds_train: the training engine (ZeRO 0-2, mixed precision, checkpoints), DeepSpeed-compatible API.

    import ds_train as deepspeed
    engine, optimizer, loader, scheduler = deepspeed.initialize(model=model, config="ds_config.json")
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
"""
from ds_train.api import add_config_arguments, init_distributed, initialize
from ds_train.config import TrainConfig, load_train_config
from ds_train.engine import DeepSpeedEngine

__version__ = "0.1.0"

__all__ = ["initialize", "init_distributed", "add_config_arguments", "DeepSpeedEngine", "TrainConfig",
           "load_train_config", "__version__"]
