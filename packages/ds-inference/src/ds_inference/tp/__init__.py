"""Automatic tensor parallelism for inference."""

from .auto_tp import TPPlanError, auto_tensor_parallel, find_layer_list
from .layers import LinearAllreduce, MoEExpertsAllreduce

__all__ = ["LinearAllreduce", "MoEExpertsAllreduce", "TPPlanError", "auto_tensor_parallel", "find_layer_list"]
