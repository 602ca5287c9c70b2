"""Optimizers by DeepSpeed config name (Adam, AdamW, Lamb, SGD, Adagrad, Lion), CPU-offload variants."""
from ds_train.optim.factory import ELEMENTWISE_OPTIMIZERS, OPTIMIZER_NAMES, build_optimizer, is_elementwise
from ds_train.optim.lamb import Lamb
from ds_train.optim.lion import Lion
from ds_train.optim.state_init import materialize_state

__all__ = ["ELEMENTWISE_OPTIMIZERS", "OPTIMIZER_NAMES", "build_optimizer", "is_elementwise", "Lamb", "Lion",
           "materialize_state"]
