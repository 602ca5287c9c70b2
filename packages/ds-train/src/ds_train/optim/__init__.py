"""Optimizers by DeepSpeed config name (Adam, AdamW, Lamb, SGD, Adagrad, Lion), CPU-offload variants."""
from ds_train.optim.factory import ELEMENTWISE_OPTIMIZERS, OPTIMIZER_NAMES, build_optimizer, is_elementwise
from ds_train.optim.lamb import Lamb
from ds_train.optim.lion import Lion

__all__ = ["ELEMENTWISE_OPTIMIZERS", "OPTIMIZER_NAMES", "build_optimizer", "is_elementwise", "Lamb", "Lion"]
