"""Config sections of ZeRO-Infinity: ``zero_optimization.offload_param`` and ``aio`` (DeepSpeed's keys).

The engine's `ZeroConfig` holds `offload_param` and `TrainConfig` holds `aio`; the stage-3 strategy
reads them through `Stage3Options.from_config`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from ds_core.config import DSConfigModel
from pydantic import Field, field_validator, model_validator

__all__ = ["OffloadParamConfig", "AioConfig"]


def _int_from_float(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)  # DeepSpeed configs often write 1e8
    return v


def _reject_unimplemented(model: DSConfigModel, section: str, fields: dict[str, str]) -> None:
    """Keys DeepSpeed has that we accept only at their default: any other value would be silently ignored."""
    for name, why in fields.items():
        default = type(model).model_fields[name].default
        if name in model.model_fields_set and getattr(model, name) != default:
            raise ValueError(f"{section}.{name}={getattr(model, name)!r} is not supported yet ({why}); "
                             f"remove it or set it to {default!r}")


class OffloadParamConfig(DSConfigModel):
    """``zero_optimization.offload_param``: where ZeRO-3 keeps the model-dtype parameter shards."""

    device: Literal["none", "cpu", "nvme"] = Field("none", description="'cpu': host memory; 'nvme': files.")
    nvme_path: str | None = Field(None, description="Folder on the NVMe drive for the swap files (nvme only).")
    buffer_count: int = Field(5, ge=1, description="Parameter swap buffers, each one shard (nvme only): "
                                                    "reads of the next modules' shards run ahead into them.")
    buffer_size: int = Field(100_000_000, ge=1, description="Elements per swap buffer; >= the largest shard.")
    max_in_cpu: int = Field(1_000_000_000, ge=0, description="Elements kept in host memory with nvme (upper bound).")
    pin_memory: bool = Field(False, description="Page-lock the host shards (faster copies on GPUs).")

    _float_ints = field_validator("buffer_size", "max_in_cpu", mode="before")(_int_from_float)

    @model_validator(mode="after")
    def _check(self) -> OffloadParamConfig:
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload_param.device='nvme' needs offload_param.nvme_path")
        _reject_unimplemented(self, "offload_param", {
            "max_in_cpu": "parameter shards go straight to NVMe; there is no host cache to size",
        })
        return self


class AioConfig(DSConfigModel):
    """``aio``: the asynchronous file I/O used by NVMe offload (ds-kernels' aio engine)."""

    _deprecated_keys: ClassVar = {"thread_count": ("intra_op_parallelism", None)}

    block_size: int = Field(1_048_576, ge=4096, description="Bytes per I/O request (a multiple of 4096).")
    queue_depth: int = Field(8, ge=1, description="Requests in flight per file operation.")
    intra_op_parallelism: int = Field(1, ge=1, description="I/O worker threads.")
    single_submit: bool = Field(False, description="Submit requests one by one (accepted; the engine batches).")
    overlap_events: bool = Field(True, description="Overlap submission and completion (always true here).")
    use_gds: bool = Field(False, description="GPUDirect Storage; only false is supported.")

    @field_validator("block_size")
    @classmethod
    def _aligned(cls, v: int) -> int:
        if v % 4096:
            raise ValueError(f"aio.block_size must be a multiple of 4096, got {v}")
        return v

    @model_validator(mode="after")
    def _check_unimplemented(self) -> AioConfig:
        _reject_unimplemented(self, "aio", {
            "single_submit": "the engine always batches submissions",
            "overlap_events": "submission and completion always overlap",
        })
        return self

    @field_validator("use_gds")
    @classmethod
    def _no_gds(cls, v: bool) -> bool:
        if v:
            raise ValueError("aio.use_gds=true is not supported (no GPUDirect Storage path)")
        return v
