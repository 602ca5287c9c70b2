"""The one object a training engine needs to apply ds-data: `DataEfficiency`.

Contract (what ds-train calls, in this order; everything else is internal):

    de = DataEfficiency.from_ds_config(ds_config_dict, model=None, global_batch_size=..., train_iters=...)
    model = de.wrap_model(model)                 # random-LTD layers (no-op when off); before the optimizer
    sampler = de.build_data_sampler(...)         # only when de.needs_data_sampler (metric curricula)
    for each optimizer step, with global_step = optimizer steps completed so far (0 first):
        de.on_step_begin(global_step)            # advances curriculum difficulty and random-LTD keep count
        for each micro-batch: batch = de.transform_batch(batch)   # seqlen truncate/reshape
        lr = peak_lr * de.lr_scale()             # only when de.drives_lr (layer_token_lr_schedule on)
    checkpoint: sd = de.state_dict() / de.load_state_dict(sd)   # plain Python/torch objects, torch.save-able

`from_ds_config` reads the legacy top-level ``curriculum_learning`` and the ``data_efficiency``
sections of a whole DeepSpeed config and validates them strictly; other top-level keys are ignored
here (they belong to the engine), except ``train_batch_size`` which is the default global batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ds_core.config import ConfigError, DSConfigModel, load_config_source, parse_config
from ds_core.logging import log_dist, warn_once
from pydantic import Field
from torch import nn

from ds_data.config import SEQLEN_METRICS, CurriculumLegacyConfig, DataEfficiencyConfig
from ds_data.curriculum import CurriculumScheduler, reshape_batch, truncate_batch
from ds_data.random_ltd import LayerTokenLR, RandomLTDScheduler, RandomLTDState, convert_to_random_ltd

__all__ = ["DataEfficiency"]


class _DataSections(DSConfigModel):
    """The two top-level sections ds-data owns; validated together so errors carry full paths."""

    data_efficiency: DataEfficiencyConfig | None = Field(None, description="DeepSpeed's data_efficiency.")
    curriculum_learning: CurriculumLegacyConfig | None = Field(None, description="Legacy seqlen curriculum.")


class DataEfficiency:
    """Curriculum (seqlen) batch transforms, random-LTD, token-based LR and the curriculum sampler."""

    def __init__(
        self,
        data_efficiency: DataEfficiencyConfig | None = None,
        curriculum_legacy: CurriculumLegacyConfig | None = None,
        global_batch_size: int | None = None,
        train_iters: int | None = None,
        data_parallel_rank: int = 0,
    ) -> None:
        self.config = data_efficiency or DataEfficiencyConfig()
        self.legacy = curriculum_legacy or CurriculumLegacyConfig()
        self.seqlen_scheduler: CurriculumScheduler | None = None
        self.seqlen_mode = "truncate"
        self.random_ltd: RandomLTDScheduler | None = None
        self.ltd_state: RandomLTDState | None = None
        self.token_lr: LayerTokenLR | None = None
        self.sampler = None
        self.global_step = -1
        self.data_parallel_rank = data_parallel_rank  # default rank of build_data_sampler/build_data_loader
        self._warn_switched_off()
        self._setup_seqlen()
        if self.config.random_ltd_enabled:
            self._setup_random_ltd(global_batch_size, train_iters)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_ds_config(
        cls,
        config: Mapping[str, Any] | str,
        model: nn.Module | None = None,
        *,
        global_batch_size: int | None = None,
        train_iters: int | None = None,
        data_parallel_rank: int = 0,
    ) -> DataEfficiency:
        """Build from a whole DeepSpeed config (dict, JSON string or path); wraps `model` if given.

        `global_batch_size` defaults to the config's ``train_batch_size``; random-LTD needs one of
        them. `train_iters` is needed only by ``layer_token_lr_schedule`` without
        ``total_layer_tokens``.
        """
        data = load_config_source(config)
        ours = {k: data[k] for k in ("data_efficiency", "curriculum_learning") if data.get(k) is not None}
        sections = parse_config(_DataSections, ours)
        if global_batch_size is None and isinstance(data.get("train_batch_size"), int):
            global_batch_size = data["train_batch_size"]
        obj = cls(
            sections.data_efficiency,
            sections.curriculum_learning,
            global_batch_size=global_batch_size,
            train_iters=train_iters,
            data_parallel_rank=data_parallel_rank,
        )
        if model is not None:
            obj.wrap_model(model)
        return obj

    def _warn_switched_off(self) -> None:
        """A feature enabled under a disabled parent switch is off (as in DeepSpeed); say so once."""
        cfg = self.config
        rl = cfg.data_routing.random_ltd
        cl = cfg.data_sampling.curriculum_learning
        if rl is not None and rl.enabled and not cfg.random_ltd_enabled:
            off = "data_efficiency.enabled" if not cfg.enabled else "data_efficiency.data_routing.enabled"
            warn_once(
                f"data_efficiency.data_routing.random_ltd.enabled is true but {off} is false: random-LTD is off"
            )
        if cl.enabled and not cfg.curriculum_enabled:
            off = "data_efficiency.enabled" if not cfg.enabled else "data_efficiency.data_sampling.enabled"
            warn_once(
                f"data_efficiency.data_sampling.curriculum_learning.enabled is true but {off} is false: it is off"
            )

    def _setup_seqlen(self) -> None:
        seqlen_metrics = {}
        if self.config.curriculum_enabled:
            metrics = self.config.data_sampling.curriculum_learning.curriculum_metrics
            seqlen_metrics = {k: v for k, v in metrics.items() if k in SEQLEN_METRICS}
        if self.legacy.enabled and seqlen_metrics:
            raise ConfigError(
                "both the legacy 'curriculum_learning' section and data_efficiency curriculum metric "
                f"'{next(iter(seqlen_metrics))}' set a sequence-length curriculum; keep one"
            )
        if self.legacy.enabled:
            self.seqlen_scheduler = CurriculumScheduler(self.legacy)
            self.seqlen_mode = self.legacy.seqlen_mode
        elif seqlen_metrics:
            name, metric = next(iter(seqlen_metrics.items()))
            self.seqlen_scheduler = CurriculumScheduler(metric)
            self.seqlen_mode = "truncate" if name == "seqlen_truncate" else "reshape"

    def _setup_random_ltd(self, global_batch_size: int | None, train_iters: int | None) -> None:
        cfg = self.config.data_routing.random_ltd
        batch = cfg.global_batch_size or global_batch_size
        if batch is None:
            raise ConfigError(
                "data_efficiency.data_routing.random_ltd needs the global batch size to count layer-tokens: set "
                "random_ltd.global_batch_size or train_batch_size, or pass global_batch_size="
            )
        self.random_ltd = RandomLTDScheduler(cfg, batch)
        # token choices use torch's global RNG (checkpoint-safe); the engine seeds and checkpoints it
        self.ltd_state = RandomLTDState(keep=self.random_ltd.current_value)
        lr_cfg = cfg.layer_token_lr_schedule
        if lr_cfg.enabled:
            total = lr_cfg.total_layer_tokens
            if total is None:
                if train_iters is None:
                    raise ConfigError(
                        "random_ltd.layer_token_lr_schedule: set total_layer_tokens, or pass train_iters= so it can "
                        "be computed from the schedule"
                    )
                total = self.random_ltd.get_total_layer_tokens(train_iters)
            self.token_lr = LayerTokenLR(lr_cfg, total)

    # -- what the engine calls ----------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        """True when any ds-data feature is active."""
        return bool(self.seqlen_scheduler or self.random_ltd or self.needs_data_sampler)

    @property
    def needs_data_sampler(self) -> bool:
        """True when a curriculum over analyzed metrics needs `build_data_sampler` for the data loader."""
        if not self.config.curriculum_enabled:
            return False
        metrics = self.config.data_sampling.curriculum_learning.curriculum_metrics
        return any(k not in SEQLEN_METRICS for k in metrics)

    @property
    def drives_lr(self) -> bool:
        """True when `lr_scale()` replaces the engine's step-based LR schedule."""
        return self.token_lr is not None

    @property
    def current_seqlen(self) -> int | None:
        """The curriculum sequence length for this step, or None without a seqlen curriculum."""
        return None if self.seqlen_scheduler is None else int(self.seqlen_scheduler.current_difficulty)

    @property
    def random_ltd_keep(self) -> int | None:
        """Tokens the random-LTD layers keep this step, or None when random-LTD is off."""
        return None if self.random_ltd is None else self.random_ltd.current_value

    def set_custom_get_difficulty(self, fn) -> None:
        """The step -> sequence length function of a 'custom' seqlen schedule."""
        if self.seqlen_scheduler is None:
            raise ValueError("no sequence-length curriculum is configured")
        self.seqlen_scheduler.set_custom_get_difficulty(fn)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Give the configured layers the token-dropping forward (in place; names/state_dict keys unchanged)."""
        if self.random_ltd is None:
            return model
        cfg = self.config.data_routing.random_ltd
        convert_to_random_ltd(
            model,
            cfg.random_ltd_layer_id,
            cfg.total_layer_num,
            self.ltd_state,
            mask_name=cfg.model_mask_name,
            hidden_state_order=cfg.hidden_state_order,
        )
        log_dist(f"random-LTD: converted layers {cfg.random_ltd_layer_id} of {cfg.total_layer_num}")
        return model

    def on_step_begin(self, global_step: int) -> None:
        """Advance the schedules to `global_step` (optimizer steps completed so far; 0 for the first)."""
        self.global_step = global_step
        if self.seqlen_scheduler is not None:
            # DeepSpeed's engine asks for the difficulty of global_steps + 1 before the forward
            self.seqlen_scheduler.update_difficulty(global_step + 1)
        if self.random_ltd is not None:
            self.ltd_state.keep = self.random_ltd.update_seq(global_step)

    def transform_batch(self, batch: Any) -> Any:
        """Cut (or fold) the batch to the curriculum sequence length; identity without a seqlen curriculum."""
        if self.seqlen_scheduler is None:
            return batch
        seqlen = int(self.seqlen_scheduler.current_difficulty)
        return (
            truncate_batch(batch, seqlen) if self.seqlen_mode == "truncate" else reshape_batch(batch, seqlen)
        )

    def lr_scale(self) -> float:
        """Multiplier of the peak LR from consumed layer-tokens; 1.0 when the token LR schedule is off."""
        if self.token_lr is None:
            return 1.0
        return self.token_lr.scale(self.random_ltd.consumed_layer_tokens)

    def build_data_sampler(
        self,
        micro_batch_size: int,
        data_parallel_rank: int | None = None,
        data_parallel_size: int = 1,
        gradient_accumulation_steps: int = 1,
    ):
        """The curriculum batch sampler over analyzed metrics (a `torch.utils.data` batch_sampler).

        It yields this rank's micro-batches (lists of sample ids), `gradient_accumulation_steps` of them
        per optimizer step; batches are always full (the sampler rolls into the next epoch).
        `data_parallel_rank` defaults to the one given to `from_ds_config`.
        """
        if not self.needs_data_sampler:
            raise ValueError(
                "build_data_sampler needs data_efficiency.data_sampling.curriculum_learning with a "
                "metric other than seqlen_truncate/seqlen_reshape"
            )
        from ds_data.sampler import CurriculumSampler

        self.sampler = CurriculumSampler.from_config(
            self.config,
            micro_batch_size=micro_batch_size,
            data_parallel_rank=self.data_parallel_rank if data_parallel_rank is None else data_parallel_rank,
            data_parallel_size=data_parallel_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
        )
        return self.sampler

    def build_data_loader(
        self,
        dataset: Any,
        micro_batch_size: int,
        data_parallel_rank: int | None = None,
        data_parallel_size: int = 1,
        gradient_accumulation_steps: int = 1,
        collate_fn: Any = None,
        pin_memory: bool = False,
    ):
        """A DataLoader over `dataset` driven by `build_data_sampler`, with ``data_sampling.num_workers`` workers."""
        import torch.utils.data

        sampler = self.build_data_sampler(
            micro_batch_size, data_parallel_rank, data_parallel_size, gradient_accumulation_steps
        )
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.config.data_sampling.num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
        )

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global_step": self.global_step}
        if self.seqlen_scheduler is not None:
            state["seqlen_curriculum"] = self.seqlen_scheduler.state_dict()
        if self.random_ltd is not None:
            state["random_ltd"] = self.random_ltd.state_dict()
            state["random_ltd_tokens"] = self.ltd_state.state_dict()
        if self.sampler is not None:
            state["data_sampler"] = self.sampler.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        parts = {"seqlen_curriculum": self.seqlen_scheduler, "random_ltd": self.random_ltd}
        for key, owner in parts.items():
            if (owner is None) != (key not in state):
                raise ValueError(
                    f"data-efficiency checkpoint {'lacks' if owner is not None else 'has'} '{key}' but this config "
                    f"{'enables' if owner is not None else 'does not enable'} it"
                )
        self.global_step = int(state.get("global_step", -1))
        if self.seqlen_scheduler is not None:
            self.seqlen_scheduler.load_state_dict(state["seqlen_curriculum"])
        if self.random_ltd is not None:
            self.random_ltd.load_state_dict(state["random_ltd"])
            self.ltd_state.load_state_dict(state["random_ltd_tokens"])
        if "data_sampler" in state:
            if self.sampler is None:
                raise ValueError(
                    "checkpoint has data-sampler state: call build_data_sampler() before load_state_dict()"
                )
            self.sampler.load_state_dict(state["data_sampler"])
