"""Config sections owned by ds-data: the legacy ``curriculum_learning`` section and ``data_efficiency``.

Key names and defaults follow DeepSpeed's JSON format so existing ``ds_config.json`` files validate
unchanged. Validation is strict (inherited from `DSConfigModel`), and each schedule type checks that
its own keys are present and that keys meant for another schedule type are absent.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ds_core.config import DSConfigModel, parse_config
from pydantic import Field, model_validator

__all__ = [
    "CurriculumLegacyConfig",
    "CurriculumMetricConfig",
    "CurriculumScheduleConfig",
    "DataEfficiencyConfig",
    "DataRoutingConfig",
    "DataSamplingConfig",
    "DataSamplingCurriculumConfig",
    "LayerTokenLRScheduleConfig",
    "RandomLTDConfig",
    "RandomLTDScheduleConfig",
    "RandomLTDScheduleParams",
    "ScheduleType",
    "SEQLEN_METRICS",
    "parse_curriculum_legacy",
    "parse_data_efficiency",
]

ScheduleType = Literal["fixed_linear", "fixed_root", "fixed_discrete", "custom"]

#: curriculum metrics that act on the batch (sequence length) rather than on which samples are drawn
SEQLEN_METRICS = ("seqlen_truncate", "seqlen_reshape")

# which schedule_config keys each schedule type needs
_SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "fixed_linear": ("total_curriculum_step", "difficulty_step"),
    "fixed_root": ("total_curriculum_step", "difficulty_step", "root_degree"),
    "fixed_discrete": ("difficulty", "max_step"),
    "custom": (),
}


class CurriculumScheduleConfig(DSConfigModel):
    """`schedule_config` of a curriculum schedule; which keys apply depends on `schedule_type`."""

    total_curriculum_step: int | None = Field(
        None, ge=1, description="fixed_linear/fixed_root: step at which max_difficulty is reached."
    )
    difficulty_step: int | None = Field(
        None, ge=1, description="fixed_linear/fixed_root: difficulty is rounded down to a multiple of this."
    )
    root_degree: float | None = Field(
        None, gt=0, description="fixed_root: difficulty grows as (step/total)^(1/root_degree)."
    )
    difficulty: list[float] | None = Field(
        None, min_length=1, description="fixed_discrete: the difficulty of each stage, in order."
    )
    max_step: list[int] | None = Field(
        None,
        description="fixed_discrete: last step of each stage but the final one (len(difficulty) - 1 entries).",
    )


def _check_schedule(
    schedule_type: str, cfg: CurriculumScheduleConfig, min_d: float, max_d: float, where: str
) -> None:
    needed = _SCHEDULE_KEYS[schedule_type]
    given = {k for k in type(cfg).model_fields if getattr(cfg, k) is not None}
    missing = [k for k in needed if k not in given]
    if missing:
        raise ValueError(
            f"{where}schedule_type '{schedule_type}' needs schedule_config keys: {', '.join(missing)}"
        )
    extra = sorted(given - set(needed))
    if extra:
        raise ValueError(
            f"{where}schedule_config keys {', '.join(extra)} are not used by schedule_type '{schedule_type}' "
            f"(it uses: {', '.join(needed) or 'none; set the function with set_custom_get_difficulty'})"
        )
    if schedule_type == "fixed_discrete":
        if len(cfg.max_step) != len(cfg.difficulty) - 1:
            raise ValueError(
                f"{where}fixed_discrete needs len(max_step) == len(difficulty) - 1, got "
                f"{len(cfg.max_step)} and {len(cfg.difficulty)}"
            )
        if any(b <= a for a, b in zip(cfg.max_step, cfg.max_step[1:])):
            raise ValueError(
                f"{where}fixed_discrete max_step must be strictly increasing, got {cfg.max_step}"
            )
    if min_d > max_d:
        raise ValueError(f"{where}min_difficulty ({min_d}) is larger than max_difficulty ({max_d})")


class CurriculumLegacyConfig(DSConfigModel):
    """DeepSpeed's legacy top-level ``curriculum_learning`` section (sequence-length curriculum)."""

    enabled: bool = Field(False, description="Turn the legacy curriculum on.")
    curriculum_type: Literal["seqlen"] = Field(
        "seqlen", description="What the difficulty controls; only 'seqlen' (truncate each batch's sequences)."
    )
    min_difficulty: int = Field(8, ge=1, description="Difficulty (sequence length) at step 0.")
    max_difficulty: int = Field(
        1024, ge=1, description="Difficulty (sequence length) at the end of the curriculum."
    )
    schedule_type: ScheduleType = Field("fixed_linear", description="How difficulty grows with the step.")
    schedule_config: CurriculumScheduleConfig = Field(
        default_factory=CurriculumScheduleConfig,
        description="Parameters of the schedule (see schedule_type).",
    )
    seqlen_mode: Literal["truncate", "reshape"] = Field(
        "truncate",
        description="(ds-data extension) 'truncate' drops tokens past the difficulty; 'reshape' folds each "
        "sequence into rows of the difficulty length so every token is still trained on.",
    )

    @model_validator(mode="after")
    def _check(self) -> CurriculumLegacyConfig:
        if self.enabled:
            _check_schedule(
                self.schedule_type, self.schedule_config, self.min_difficulty, self.max_difficulty, ""
            )
        return self


class CurriculumMetricConfig(DSConfigModel):
    """One entry of ``data_sampling.curriculum_learning.curriculum_metrics``."""

    index_to_sample_path: str | None = Field(
        None,
        description="Index of this metric written by DataAnalyzer (its metric directory, or a file in it).",
    )
    index_to_metric_path: str | None = Field(
        None,
        description="Metric values of the index; with ds-data the same metric directory as index_to_sample_path.",
    )
    difficulty_type: Literal["value", "percentile"] = Field(
        "value",
        description="'value': window is metric <= difficulty; 'percentile': the easiest difficulty% samples.",
    )
    clustering_type: Literal["schedule_based", "single_cluster"] = Field(
        "schedule_based", description="'single_cluster' means the metric does not restrict the window."
    )
    min_difficulty: float = Field(..., description="Difficulty at step 0.")
    max_difficulty: float = Field(..., description="Difficulty at the end of the curriculum.")
    schedule_type: ScheduleType = Field("fixed_linear", description="How difficulty grows with the step.")
    schedule_config: CurriculumScheduleConfig = Field(
        default_factory=CurriculumScheduleConfig,
        description="Parameters of the schedule (see schedule_type).",
    )

    @model_validator(mode="after")
    def _check(self) -> CurriculumMetricConfig:
        _check_schedule(
            self.schedule_type, self.schedule_config, self.min_difficulty, self.max_difficulty, ""
        )
        if self.difficulty_type == "percentile" and not (
            0 < self.min_difficulty and self.max_difficulty <= 100
        ):
            raise ValueError("percentile difficulties must lie in (0, 100]")
        return self


class DataSamplingCurriculumConfig(DSConfigModel):
    """``data_sampling.curriculum_learning``: curriculum over one or more analyzed metrics."""

    enabled: bool = Field(False, description="Turn the curriculum sampler on.")
    data_cluster_path: str | None = Field(
        None,
        description="Accepted for DeepSpeed compatibility but not needed: ds-data computes the window from "
        "the index files directly and writes no cluster files (a one-time warning says so when set).",
    )
    curriculum_metrics: dict[str, CurriculumMetricConfig] = Field(
        default_factory=dict,
        description="Metric name -> schedule. 'seqlen_truncate'/'seqlen_reshape' act on the batch; any other "
        "name needs index files from DataAnalyzer.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataSamplingCurriculumConfig:
        if not self.enabled:
            return self
        if not self.curriculum_metrics:
            raise ValueError("curriculum_learning is enabled but curriculum_metrics is empty")
        seqlen = [m for m in self.curriculum_metrics if m in SEQLEN_METRICS]
        if len(seqlen) > 1:
            raise ValueError(f"give at most one of {', '.join(SEQLEN_METRICS)}, got {', '.join(seqlen)}")
        for name, metric in self.curriculum_metrics.items():
            if name in SEQLEN_METRICS:
                if metric.difficulty_type != "value":
                    raise ValueError(
                        f"curriculum_metrics.{name}: difficulty_type must be 'value' (a sequence length)"
                    )
                continue
            if metric.index_to_sample_path is None:
                raise ValueError(
                    f"curriculum_metrics.{name}: index_to_sample_path is required (run DataAnalyzer)"
                )
        return self


class DataSamplingConfig(DSConfigModel):
    """``data_efficiency.data_sampling``."""

    _unsupported_keys: ClassVar[dict[str, str]] = {
        "dynamic_batching": "dynamic batching (variable batch size by token count) is not implemented in ds-data",
    }

    enabled: bool = Field(False, description="Turn data sampling (the curriculum sampler) on.")
    num_epochs: int = Field(1000, ge=1, description="Epochs the sampler may run before it stops.")
    num_workers: int = Field(0, ge=0, description="DataLoader workers for the curriculum data loader.")
    curriculum_learning: DataSamplingCurriculumConfig = Field(
        default_factory=DataSamplingCurriculumConfig, description="Curriculum learning over analyzed metrics."
    )


class RandomLTDScheduleParams(DSConfigModel):
    """``random_ltd_schedule.schedule_config``."""

    require_steps: int = Field(..., ge=1, description="Step at which the kept-token count reaches max_value.")
    seq_per_step: int = Field(
        ..., ge=1, description="Kept-token count is rounded down to a multiple of this."
    )


class RandomLTDScheduleConfig(DSConfigModel):
    """``random_ltd.random_ltd_schedule``: how many tokens the dropping layers keep at each step."""

    min_value: int = Field(..., ge=1, description="Kept tokens at step 0.")
    max_value: int = Field(..., ge=1, description="Kept tokens at the end of the schedule (the full length).")
    schedule_type: Literal["fixed_linear"] = Field(
        "fixed_linear", description="Only 'fixed_linear' (as DeepSpeed)."
    )
    schedule_config: RandomLTDScheduleParams = Field(..., description="require_steps and seq_per_step.")

    @model_validator(mode="after")
    def _check(self) -> RandomLTDScheduleConfig:
        if self.min_value > self.max_value:
            raise ValueError(f"min_value ({self.min_value}) is larger than max_value ({self.max_value})")
        return self


class LayerTokenLRScheduleConfig(DSConfigModel):
    """``random_ltd.layer_token_lr_schedule``: learning rate driven by consumed layer-tokens instead of steps."""

    enabled: bool = Field(False, description="Scale the learning rate by consumed layer-tokens.")
    total_layer_tokens: int | None = Field(
        None,
        ge=1,
        description="Layer-tokens at the end of decay; None: computed from train_iters by the scheduler.",
    )
    warmup_type: Literal["linear", "log"] = Field(
        "linear", description="Warmup shape (as DeepSpeed's WarmupLR)."
    )
    warmup_layer_tokens: int = Field(0, ge=0, description="Layer-tokens of warmup from 0 to the peak LR.")
    decay_type: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="(ds-data extension) decay shape after warmup, as Megatron's --lr-decay-tokens."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0.0, le=1.0, description="(ds-data extension) floor of the LR multiplier."
    )


class RandomLTDConfig(DSConfigModel):
    """``data_routing.random_ltd``: random layerwise token dropping."""

    _unsupported_keys: ClassVar[dict[str, str]] = {
        "micro_batch_size": "not needed: the batch size is read from the hidden states",
    }

    enabled: bool = Field(False, description="Turn random-LTD on.")
    total_layer_num: int = Field(..., ge=1, description="Number of transformer layers in the model.")
    random_ltd_layer_num: int = Field(..., ge=1, description="How many layers drop tokens.")
    random_ltd_layer_id: list[int] = Field(
        ..., description="Indices (0-based) of the layers that drop tokens."
    )
    model_mask_name: str | None = Field(
        "attention_mask", description="Name of the attention-mask argument of the layers' forward."
    )
    model_type: Literal["decoder", "encoder"] = Field(
        "decoder", description="'decoder' (causal) or 'encoder'."
    )
    hidden_state_order: Literal["batch_seq_dim", "seq_batch_dim"] = Field(
        "batch_seq_dim", description="Layout of the layers' hidden states ([B, T, H] or [T, B, H])."
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per optimizer step, for layer-token counting; default: train_batch_size.",
    )
    random_ltd_schedule: RandomLTDScheduleConfig = Field(..., description="The kept-token schedule.")
    layer_token_lr_schedule: LayerTokenLRScheduleConfig = Field(
        default_factory=LayerTokenLRScheduleConfig, description="Token-based learning-rate decay."
    )

    @model_validator(mode="after")
    def _check(self) -> RandomLTDConfig:
        ids = self.random_ltd_layer_id
        if len(ids) != self.random_ltd_layer_num:
            raise ValueError(
                f"random_ltd_layer_id has {len(ids)} entries but random_ltd_layer_num is {self.random_ltd_layer_num}"
            )
        if len(set(ids)) != len(ids) or any(i < 0 or i >= self.total_layer_num for i in ids):
            raise ValueError(
                f"random_ltd_layer_id must be distinct layer indices in [0, {self.total_layer_num}), got {ids}"
            )
        return self


class DataRoutingConfig(DSConfigModel):
    """``data_efficiency.data_routing``."""

    enabled: bool = Field(False, description="Turn data routing on.")
    random_ltd: RandomLTDConfig | None = Field(None, description="Random layerwise token dropping.")


class DataEfficiencyConfig(DSConfigModel):
    """DeepSpeed's ``data_efficiency`` section."""

    enabled: bool = Field(False, description="Master switch of the data efficiency library.")
    seed: int = Field(
        1234,
        description="Seed of the curriculum sampler. Random-LTD draws tokens from torch's global RNG (so "
        "activation checkpointing recomputes the same choice), seeded by torch.manual_seed.",
    )
    data_sampling: DataSamplingConfig = Field(
        default_factory=DataSamplingConfig, description="Curriculum sampling."
    )
    data_routing: DataRoutingConfig = Field(default_factory=DataRoutingConfig, description="Random-LTD.")

    @property
    def random_ltd_enabled(self) -> bool:
        rl = self.data_routing.random_ltd
        return bool(self.enabled and self.data_routing.enabled and rl is not None and rl.enabled)

    @property
    def curriculum_enabled(self) -> bool:
        return bool(
            self.enabled and self.data_sampling.enabled and self.data_sampling.curriculum_learning.enabled
        )


def parse_data_efficiency(source: Any) -> DataEfficiencyConfig:
    """Validate a ``data_efficiency`` section (dict, JSON string or path) with path-qualified errors."""
    return parse_config(DataEfficiencyConfig, source)


def parse_curriculum_legacy(source: Any) -> CurriculumLegacyConfig:
    """Validate a legacy ``curriculum_learning`` section."""
    return parse_config(CurriculumLegacyConfig, source)
