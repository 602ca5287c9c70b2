"""``init_inference`` configuration: DeepSpeed's inference keys, strict."""

from __future__ import annotations

from typing import Literal

import torch
from ds_core.config import DSConfigModel
from pydantic import Field, field_validator

__all__ = [
    "InferenceConfig",
    "TensorParallelConfig",
    "QuantConfig",
    "WeightQuantConfig",
    "ZeroInferenceConfig",
    "OffloadParamConfig",
    "resolve_dtype",
]

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype {value!r} is not supported; use one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[key]


class TensorParallelConfig(DSConfigModel):
    """Automatic tensor parallelism (DeepSpeed's ``tensor_parallel``)."""

    _unsupported_keys = {
        "mpu": "pass tp_size; the group is the world of ds_core.comm",
        "tp_group": "pass tp_size; the group is the world of ds_core.comm",
        "tp_grain_size": "shards are cut at head boundaries",
    }
    enabled: bool = Field(True, description="Shard the model when tp_size > 1.")
    tp_size: int = Field(1, ge=1, description="Number of ranks the attention/MLP linears are split across.")


class WeightQuantConfig(DSConfigModel):
    """Weight-only quantization of the decoder linears (ds_kernels.quant)."""

    _unsupported_keys = {
        "quantized_initialization": "quantize a loaded model instead",
        "post_init_quant": "quantize a loaded model instead",
    }
    enabled: bool = Field(True, description="Quantize weights when quant.enabled is true.")
    num_bits: Literal[4, 8] = Field(8, description="Bits per weight (8 or 4).")
    q_type: Literal["symmetric", "asymmetric"] = Field("symmetric", description="Zero point or not.")
    group_size: int = Field(64, ge=1, description="Input features sharing one scale.")


class QuantConfig(DSConfigModel):
    """DeepSpeed's ``quant`` section (weight-only here)."""

    _unsupported_keys = {
        "activation": "only weight-only quantization is implemented",
        "qkv": "only weight-only quantization is implemented",
    }
    enabled: bool = Field(False, description="Quantize the model's linear weights.")
    weight: WeightQuantConfig = Field(default_factory=WeightQuantConfig, description="Weight quantization.")


class OffloadParamConfig(DSConfigModel):
    """Where ZeRO-Inference keeps weights between uses (``zero_optimization.offload_param``)."""

    device: Literal["cpu", "nvme"] = Field("cpu", description="Host memory or files on an NVMe path.")
    nvme_path: str | None = Field(None, description="Directory for the weight files (device='nvme').")
    pin_memory: bool = Field(False, description="Page-lock host copies for faster device transfers.")
    buffer_count: int = Field(2, ge=1, description="Layers resident at once (1 + prefetch depth).")


class ZeroInferenceConfig(DSConfigModel):
    """ZeRO-Inference: stream decoder layers to the device one at a time."""

    stage: Literal[3] = Field(3, description="ZeRO-Inference is a stage-3 feature.")
    offload_param: OffloadParamConfig = Field(
        default_factory=OffloadParamConfig, description="Where weights live between uses."
    )

    @field_validator("offload_param")
    @classmethod
    def _nvme_needs_path(cls, v: OffloadParamConfig) -> OffloadParamConfig:
        if v.device == "nvme" and not v.nvme_path:
            raise ValueError("offload_param.device='nvme' needs offload_param.nvme_path")
        return v


class InferenceConfig(DSConfigModel):
    """Keys of DeepSpeed's ``init_inference`` config that this engine implements."""

    _deprecated_keys = {"mp_size": ("tensor_parallel", lambda n: {"tp_size": n})}
    _unsupported_keys = {
        "enable_cuda_graph": "CUDA graphs are not implemented",
        "checkpoint": "load the model with transformers first, then call init_inference",
        "injection_policy": "automatic tensor parallelism derives the plan from the model",
        "moe": "Mixtral-style MoE models are sharded by tensor parallelism; expert parallelism is not implemented",
    }
    dtype: str | torch.dtype | None = Field(
        None,
        description="Cast weights to this dtype; None keeps the model's dtype (DeepSpeed defaults to fp16).",
    )
    tensor_parallel: TensorParallelConfig = Field(
        default_factory=TensorParallelConfig, alias="tp", description="Automatic tensor parallelism."
    )
    replace_with_kernel_inject: bool = Field(
        False, alias="kernel_inject", description="Swap attention/MLP/norm modules for fused implementations."
    )
    quant: QuantConfig = Field(default_factory=QuantConfig, description="Weight-only quantization.")
    zero: ZeroInferenceConfig | None = Field(None, description="ZeRO-Inference weight streaming.")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v):
        return resolve_dtype(v)
