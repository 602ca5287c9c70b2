"""The ds-train config tree: DeepSpeed's JSON keys and defaults, strict (unknown keys are errors).

`TrainConfig` is the root. Sections owned by later issues (ZeRO-3, NVMe, pipeline, MoE, sequence
parallel, ...) are rejected by name with "not supported yet" so a config never half-works.
`resolve_batch_sizes` fills the three batch keys from any two of them (DeepSpeed's rules).
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from ds_core.config import Auto, ConfigError, DSConfigModel, is_auto, parse_config
from pydantic import Field, field_validator, model_validator

from ds_train.offload.config import AioConfig, OffloadParamConfig

__all__ = [
    "TrainConfig",
    "FP16Config",
    "BF16Config",
    "ZeroConfig",
    "OffloadOptimizerConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "CheckpointConfig",
    "CommsLoggerConfig",
    "MonitorConfig",
    "DataTypesConfig",
    "load_train_config",
    "resolve_batch_sizes",
]

_LATER = "not supported yet (a later ds-train issue implements it); remove the key"
_STAGE3 = "not supported yet: it needs ZeRO stage 3 (ds-train issue 5); remove the key or use stage <= 2"


class FP16Config(DSConfigModel):
    """``fp16``: half precision with dynamic (or static) loss scaling."""

    enabled: bool | Auto = Field(False, description="Train with fp16 parameters and fp32 master weights.")
    auto_cast: bool = Field(False, description="Cast floating-point inputs of forward() to fp16.")
    loss_scale: float = Field(0.0, ge=0, description="0 = dynamic loss scaling; > 0 = this static scale.")
    initial_scale_power: int = Field(16, ge=0, le=64, description="Dynamic scaling starts at 2**power.")
    loss_scale_window: int = Field(1000, ge=1, description="Overflow-free steps before the scale doubles.")
    hysteresis: int = Field(2, ge=1, description="Overflows tolerated before the scale is halved.")
    consecutive_hysteresis: bool = Field(
        False, description="Refill the hysteresis budget after every overflow-free step (else only on growth)."
    )
    min_loss_scale: float = Field(1.0, gt=0, description="The scale never drops below this.")
    fp16_master_weights_and_grads: bool = Field(
        False, description="Keep master weights in fp16 (only False is supported)."
    )

    @field_validator("fp16_master_weights_and_grads")
    @classmethod
    def _no_fp16_master(cls, v: bool) -> bool:
        if v:
            raise ValueError("fp16_master_weights_and_grads=true is not supported: master weights are fp32")
        return v


class BF16Config(DSConfigModel):
    """``bf16``: bfloat16 parameters with fp32 master weights (no loss scaling needed)."""

    enabled: bool | Auto = Field(False, description="Train with bf16 parameters and fp32 master weights.")
    immediate_grad_update: bool = Field(
        False, description="DeepSpeed's per-param eager update; only False (update at the step) is supported."
    )

    @field_validator("immediate_grad_update")
    @classmethod
    def _no_immediate(cls, v: bool) -> bool:
        if v:
            raise ValueError("immediate_grad_update=true is not supported yet; the update runs in engine.step()")
        return v


class OptimizerConfig(DSConfigModel):
    """``optimizer``: a type name (Adam, AdamW, Lamb, SGD, Adagrad, Lion) and its constructor params."""

    type: str = Field(..., description="Optimizer name, case-insensitive: Adam, AdamW, Lamb, SGD, Adagrad, Lion.")
    params: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments (lr, betas, ...).")
    legacy_fusion: bool = Field(False, description="Accepted for DeepSpeed compatibility; must be false.")


class SchedulerConfig(DSConfigModel):
    """``scheduler``: a DeepSpeed LR schedule name and its params."""

    type: str = Field(
        ..., description="WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle or LRRangeTest."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Schedule arguments, DeepSpeed's names.")


class OffloadOptimizerConfig(DSConfigModel):
    """``zero_optimization.offload_optimizer``: keep the fp32 master shard and optimizer state in host memory."""

    device: Literal["none", "cpu", "nvme"] = Field("none", description="'cpu' enables ZeRO-Offload.")
    pin_memory: bool = Field(False, description="Page-lock the host buffers (faster copies on GPUs).")
    buffer_count: int = Field(4, ge=1, description="NVMe swap buffers (NVMe only).")
    fast_init: bool = Field(False, description="NVMe fast init (NVMe only).")
    nvme_path: str | None = Field(None, description="NVMe swap directory (NVMe only).")
    pipeline_read: bool = Field(False, description="NVMe read pipelining (NVMe only).")
    pipeline_write: bool = Field(False, description="NVMe write pipelining (NVMe only).")
    ratio: float = Field(1.0, gt=0, le=1, description="Fraction of the optimizer offloaded; only 1.0 is supported.")

    @model_validator(mode="after")
    def _check(self) -> OffloadOptimizerConfig:
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("offload_optimizer.device='nvme' needs offload_optimizer.nvme_path")
        if self.ratio != 1.0:
            raise ValueError("offload_optimizer.ratio < 1 (partial offload) is not supported yet; use 1.0")
        return self


def _cpu_offload_alias(value: Any) -> Any:
    return {"device": "cpu"} if value else None


class ZeroConfig(DSConfigModel):
    """``zero_optimization``: ZeRO stages 0-2 (stage 3 comes with issue 5)."""

    _deprecated_keys: ClassVar = {
        "cpu_offload": ("offload_optimizer", _cpu_offload_alias),
        "stage3_gather_fp16_weights_on_model_save": ("stage3_gather_16bit_weights_on_model_save", None),
    }
    _unsupported_keys: ClassVar = {
        "stage3_module_granularity_threshold": _LATER,
        "stage3_use_all_reduce_for_fetch_params": _LATER,
        "zero_hpz_partition_size": _LATER,
        "zero_quantized_weights": _LATER,
        "zero_quantized_nontrainable_weights": _LATER,
        "zero_quantized_gradients": _LATER,
        "mics_shard_size": _LATER,
        "mics_hierarchical_params_gather": _LATER,
        "offload_optimizer_config": _LATER,
    }

    stage: int = Field(0, ge=0, le=3, description="0 = data parallel, 1 = optimizer states, 2 = + gradients.")
    contiguous_gradients: bool = Field(True, description="Gradients live in one contiguous buffer (always).")
    # None (unset) picks the backend's faster way: its reduce-scatter, or on gloo a reduce-scatter by
    # point-to-point sends (ds_core.comm.prefers_point_to_point); DeepSpeed's default is true
    reduce_scatter: bool | None = Field(
        None, description="Reduce-scatter gradients (false: all-reduce; unset: the backend's faster one)."
    )
    reduce_bucket_size: int = Field(500_000_000, ge=1, description="Elements per gradient reduction bucket.")
    allgather_partitions: bool | None = Field(
        None, description="All-gather updated params (false: one broadcast per rank; unset: the faster one)."
    )
    allgather_bucket_size: int = Field(500_000_000, ge=1, description="Max elements moved per all-gather call.")
    overlap_comm: bool | None = Field(
        None, description="Launch each bucket's reduction asynchronously during backward (default true)."
    )
    round_robin_gradients: bool = Field(False, description="Round-robin gradient layout (only false supported).")
    offload_optimizer: OffloadOptimizerConfig | None = Field(
        None, description="ZeRO-Offload of the optimizer (device 'cpu')."
    )
    load_from_fp32_weights: bool = Field(True, description="On load, restore master weights from the fp32 copy.")
    elastic_checkpoint: bool = Field(False, description="DeepSpeed legacy key; our checkpoints always reshard.")
    ignore_unused_parameters: bool = Field(True, description="Parameters without a gradient count as zero grads.")
    use_multi_rank_bucket_allreduce: bool = Field(True, description="DeepSpeed stage-2 knob; kept for compatibility.")
    memory_efficient_linear: bool = Field(True, description="Stage-3 knob; accepted for compatibility.")
    legacy_stage1: bool = Field(False, description="Only false is supported.")
    # -- stage 3 / ZeRO-Infinity (ds_train.zero.stage3, ds_train.offload) --
    offload_param: OffloadParamConfig | None = Field(
        None, description="Stage 3: keep parameter shards in host memory ('cpu') or NVMe files ('nvme')."
    )
    stage3_prefetch_bucket_size: int = Field(50_000_000, ge=0, description="Elements prefetched ahead of use.")
    stage3_max_live_parameters: int = Field(1_000_000_000, ge=0, description="Whole elements held at once (cap).")
    stage3_max_reuse_distance: int = Field(
        1_000_000_000, ge=0, description="Keep a module's params if it runs again within this many elements."
    )
    stage3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="Parameters with at most this many elements stay whole on every rank."
    )
    stage3_gather_16bit_weights_on_model_save: bool = Field(
        False, description="save_16bit_model() gathers the whole weights (else it saves nothing at stage 3)."
    )
    sub_group_size: int = Field(1_000_000_000, ge=1, description="Elements per optimizer chunk (NVMe streaming).")

    @field_validator("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                     "stage3_max_live_parameters", "stage3_max_reuse_distance",
                     "stage3_param_persistence_threshold", "sub_group_size", mode="before")
    @classmethod
    def _float_sizes(cls, v: Any) -> Any:
        # DeepSpeed configs often write 5e8; accept integral floats.
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> ZeroConfig:
        if self.stage < 3 and (self.offload_param is not None and self.offload_param.device != "none"):
            raise ValueError("zero_optimization.offload_param needs stage 3")
        if self.stage < 3 and self.offload_optimizer_device == "nvme":
            raise ValueError("offload_optimizer.device='nvme' needs stage 3 (ZeRO-Infinity)")
        if not self.contiguous_gradients:
            raise ValueError("contiguous_gradients=false is not supported: gradients always use one flat buffer")
        if self.round_robin_gradients:
            raise ValueError("round_robin_gradients=true is not supported yet; remove it")
        if self.legacy_stage1:
            raise ValueError("legacy_stage1=true is not supported")
        return self

    @property
    def offload_optimizer_device(self) -> str:
        return self.offload_optimizer.device if self.offload_optimizer is not None else "none"


class CommsLoggerConfig(DSConfigModel):
    """``comms_logger``: count bytes and time of every collective (ds_core.comm.comms_logger)."""

    enabled: bool = Field(False, description="Record every collective.")
    verbose: bool = Field(False, description="Log each collective as it happens.")
    prof_all: bool = Field(True, description="Profile all ops (prof_ops is used when false).")
    debug: bool = Field(False, description="Add the caller's name to each record.")
    prof_ops: list[str] = Field(default_factory=list, description="Ops to profile when prof_all is false.")


class CheckpointConfig(DSConfigModel):
    """``checkpoint``: tag validation and storage options."""

    tag_validation: Literal["Ignore", "Warn", "Fail", "ignore", "warn", "fail"] = Field(
        "Warn", description="Check that every rank saves under the same tag."
    )
    load_universal: bool = Field(
        False, description="DeepSpeed's universal-checkpoint switch; ours reshard on load regardless."
    )
    use_node_local_storage: bool = Field(False, description="Only false (shared storage) is supported.")
    parallel_write: dict[str, Any] = Field(default_factory=dict, description="Pipeline-stage writing; unused.")

    @field_validator("use_node_local_storage")
    @classmethod
    def _no_local(cls, v: bool) -> bool:
        if v:
            raise ValueError("use_node_local_storage=true is not supported yet: checkpoints need shared storage")
        return v

    @field_validator("parallel_write")
    @classmethod
    def _no_parallel(cls, v: dict) -> dict:
        if any(v.values()):
            raise ValueError("checkpoint.parallel_write is not supported yet (needs pipeline parallelism)")
        return v


class MonitorConfig(DSConfigModel):
    """``tensorboard`` / ``csv_monitor``: write the training scalars (loss, lr, scale) every step."""

    enabled: bool = Field(False, description="Write monitor events.")
    output_path: str = Field("", description="Directory for the events (default: the current directory).")
    job_name: str = Field("DeepSpeedJobName", description="Subdirectory / file prefix for this run.")


class DataTypesConfig(DSConfigModel):
    """``data_types``: precision of the gradient accumulation buffers."""

    grad_accum_dtype: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="Dtype of accumulated gradients (default: the model's dtype)."
    )


class TrainConfig(DSConfigModel):
    """The root of a DeepSpeed-style training config (``ds_config.json``)."""

    _deprecated_keys: ClassVar = {"bfloat16": ("bf16", None)}
    _unsupported_keys: ClassVar = {
        "pipeline": _LATER,
        "tensor_parallel": _LATER,
        "sequence_parallel_size": _LATER,
        "moe": _LATER,
        "autotuning": _LATER,
        "flops_profiler": _LATER,
        "activation_checkpointing": _LATER,
        "amp": "not supported: use bf16 or fp16",
        "sparse_attention": _LATER,
        "elasticity": _LATER,
        "nebula": _LATER,
        "hybrid_engine": _LATER,
        "eigenvalue": _LATER,
        "progressive_layer_drop": _LATER,
        "compile": _LATER,
        "weight_quantization": _LATER,
        "wandb": "not supported yet; use tensorboard or csv_monitor",
        "comet": "not supported yet; use tensorboard or csv_monitor",
    }

    train_batch_size: int | Auto | None = Field(
        None, description="Global batch: micro batch x accumulation steps x data-parallel ranks."
    )
    train_micro_batch_size_per_gpu: int | Auto | None = Field(
        None, description="Samples per rank per forward/backward."
    )
    gradient_accumulation_steps: int | Auto | None = Field(
        None, description="Micro batches accumulated before each optimizer step."
    )
    gradient_clipping: float | Auto = Field(0.0, description="Clip the global grad norm to this (0 = off).")
    steps_per_print: int | None = Field(10, description="Log progress every N optimizer steps (None/0: never).")
    wall_clock_breakdown: bool = Field(False, description="Time forward/backward/step and log the breakdown.")
    memory_breakdown: bool = Field(False, description="Log a memory report with the progress line.")
    dump_state: bool = Field(False, description="Print the resolved config at initialize.")
    prescale_gradients: bool = Field(False, description="Divide gradients before (not after) the reduction.")
    gradient_predivide_factor: float = Field(1.0, gt=0, description="Divide grads by this before reduction.")
    sparse_gradients: bool = Field(False, description="Sparse embedding gradients (only false is supported).")
    zero_allow_untested_optimizer: bool = Field(
        False, description="Allow a client optimizer that is not elementwise with ZeRO stage >= 1."
    )
    zero_force_ds_cpu_optimizer: bool = Field(
        True, description="With CPU offload, require the ds-kernels CPU optimizer for Adam/AdamW."
    )
    dataloader_drop_last: bool = Field(False, description="Drop the last incomplete batch of the data loader.")
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="Dtype gradients are reduced in (default: the accumulation dtype)."
    )
    seed: int | None = Field(None, description="Seed for the data loader shuffling (default 0, as torch DistributedSampler).")
    fp16: FP16Config = Field(default_factory=FP16Config, description="fp16 mixed precision.")
    bf16: BF16Config = Field(default_factory=BF16Config, description="bf16 mixed precision.")
    optimizer: OptimizerConfig | None = Field(None, description="Optimizer built by ds-train.")
    scheduler: SchedulerConfig | None = Field(None, description="LR schedule built by ds-train.")
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig, description="ZeRO settings.")
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig, description="Collective logging.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint options.")
    tensorboard: MonitorConfig = Field(default_factory=MonitorConfig, description="TensorBoard scalars.")
    csv_monitor: MonitorConfig = Field(default_factory=MonitorConfig, description="CSV scalars.")
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig, description="Accumulation dtype.")
    aio: AioConfig = Field(default_factory=AioConfig, description="Async file I/O for NVMe offload.")
    curriculum_learning: dict[str, Any] | None = Field(
        None, description="Curriculum learning (legacy section), handled by the ds-data package."
    )
    data_efficiency: dict[str, Any] | None = Field(
        None, description="Data efficiency (curriculum, random-LTD), handled by the ds-data package."
    )
    compression_training: dict[str, Any] | None = Field(
        None, description="Compression-aware training, handled by the ds-compression package."
    )

    @field_validator("sparse_gradients")
    @classmethod
    def _no_sparse(cls, v: bool) -> bool:
        if v:
            raise ValueError("sparse_gradients=true is not supported yet")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.fp16.enabled is True and self.bf16.enabled is True:
            raise ValueError("fp16.enabled and bf16.enabled are both true; choose one")
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            value = getattr(self, key)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        return self

    # -- typed views the engine reads ---------------------------------------------------------------
    @property
    def fp16_enabled(self) -> bool:
        return self.fp16.enabled is True

    @property
    def bf16_enabled(self) -> bool:
        return self.bf16.enabled is True

    @property
    def zero_stage(self) -> int:
        return self.zero_optimization.stage


def load_train_config(source: Any) -> TrainConfig:
    """Parse a dict / JSON path / JSON string / TrainConfig into a validated `TrainConfig`."""
    return parse_config(TrainConfig, source)  # type: ignore[return-value]


def resolve_batch_sizes(config: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """Fill (train_batch_size, micro_batch, grad_accum) from any two (or one) of them, in place.

    DeepSpeed's rules: train = micro x accum x world; a missing accum defaults to 1. An ``"auto"``
    value counts as missing. Inconsistent values raise an error that shows the arithmetic.
    """
    def given(v: Any) -> int | None:
        return None if v is None or is_auto(v) else int(v)

    tb = given(config.train_batch_size)
    mb = given(config.train_micro_batch_size_per_gpu)
    ga = given(config.gradient_accumulation_steps)
    ws = world_size
    if tb is not None and mb is not None and ga is not None:
        if tb != mb * ga * ws:
            raise ConfigError(
                f"inconsistent batch sizes: train_batch_size ({tb}) must equal train_micro_batch_size_per_gpu "
                f"({mb}) x gradient_accumulation_steps ({ga}) x data-parallel world size ({ws}) = {mb * ga * ws}"
            )
    elif tb is not None and mb is not None:
        if tb % (mb * ws):
            raise ConfigError(
                f"train_batch_size ({tb}) is not divisible by train_micro_batch_size_per_gpu ({mb}) x "
                f"world size ({ws}) = {mb * ws}; gradient_accumulation_steps would not be an integer"
            )
        ga = tb // (mb * ws)
    elif tb is not None and ga is not None:
        if tb % (ga * ws):
            raise ConfigError(
                f"train_batch_size ({tb}) is not divisible by gradient_accumulation_steps ({ga}) x "
                f"world size ({ws}) = {ga * ws}; the micro batch would not be an integer"
            )
        mb = tb // (ga * ws)
    elif mb is not None:
        ga = ga or 1
        tb = mb * ga * ws
    elif tb is not None:
        ga = 1
        if tb % ws:
            raise ConfigError(f"train_batch_size ({tb}) is not divisible by the world size ({ws})")
        mb = tb // ws
    else:
        raise ConfigError(
            "the config needs train_batch_size or train_micro_batch_size_per_gpu "
            "(got neither, or only \"auto\" values that nothing filled)"
        )
    if mb < 1 or ga < 1:
        raise ConfigError(f"batch sizes resolve to micro batch {mb} and accumulation {ga}; both must be >= 1")
    config.train_batch_size = tb
    config.train_micro_batch_size_per_gpu = mb
    config.gradient_accumulation_steps = ga
    return tb, mb, ga

