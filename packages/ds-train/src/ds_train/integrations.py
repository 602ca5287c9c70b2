"""Optional packages the config can ask for: ds-data (curriculum / data efficiency) and ds-compression.

They are imported only when their config section is present (the import DAG allows ds_train to use
them lazily); a missing package is one error naming what to install.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from ds_core.config import ConfigError

__all__ = ["DataEfficiencyHook", "CompressionHook", "to_json_tree", "from_json_tree"]


def _import(module: str, pip_name: str, section: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"config section '{section}' needs the {pip_name} package: pip install {pip_name} ({exc})"
        ) from None


class DataEfficiencyHook:
    """Drives ds_data.integration.DataEfficiency from the engine (curriculum, random-LTD, token LR)."""

    def __init__(self, raw_config: dict[str, Any], model: torch.nn.Module, global_batch_size: int, rank: int,
                 train_iters: int | None = None) -> None:
        section = "data_efficiency" if raw_config.get("data_efficiency") is not None else "curriculum_learning"
        integration = _import("ds_data.integration", "ds-data", section)
        if not hasattr(integration, "DataEfficiency"):
            raise ConfigError(f"config section '{section}': the installed ds-data has no DataEfficiency; upgrade ds-data")
        try:
            # train_iters sizes the layer-token LR schedule (total layer-tokens of the whole run)
            self.impl = integration.DataEfficiency.from_ds_config(
                raw_config, global_batch_size=global_batch_size, train_iters=train_iters, data_parallel_rank=rank
            )
        except ConfigError as exc:
            if train_iters is None and "train_iters" in str(exc):
                raise ConfigError(f"{exc} (ds_train takes the training length from scheduler.params.total_num_steps "
                                  "of WarmupDecayLR/WarmupCosineLR, or the engine's train_iters)") from None
            raise
        self.impl.wrap_model(model)
        self.peak_lrs: list[float] | None = None
        self._pending_sampler_state: Any = None  # checkpointed sampler position, until the loader exists

    @property
    def needs_data_sampler(self) -> bool:
        """A curriculum over analyzed metrics: the training loader must come from `build_data_loader`."""
        return bool(self.impl.needs_data_sampler)

    def build_data_loader(self, dataset: Any, micro_batch_size: int, dp_rank: int, dp_size: int,
                          gradient_accumulation_steps: int, collate_fn: Any, num_workers: int) -> Any:
        """ds-data's curriculum DataLoader; a sampler position loaded from a checkpoint earlier is applied."""
        if num_workers:
            raise ValueError(
                f"deepspeed_io(num_local_io_workers={num_workers}): with a data_efficiency curriculum sampler the "
                "loader's workers come from data_efficiency.data_sampling.num_workers; set that instead"
            )
        loader = self.impl.build_data_loader(dataset, micro_batch_size, dp_rank, dp_size,
                                             gradient_accumulation_steps, collate_fn=collate_fn)
        if self._pending_sampler_state is not None:
            self.impl.sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        return loader

    def on_step_begin(self, global_step: int, optimizer: torch.optim.Optimizer) -> None:
        self.impl.on_step_begin(global_step)
        if self.impl.drives_lr:
            if self.peak_lrs is None:
                self.peak_lrs = [g["lr"] for g in optimizer.param_groups]
            scale = self.impl.lr_scale()
            for g, peak in zip(optimizer.param_groups, self.peak_lrs):
                g["lr"] = peak * scale

    def transform(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs:
            kwargs = self.impl.transform_batch(dict(kwargs))
        args = tuple(self.impl.transform_batch(a) if isinstance(a, (torch.Tensor, dict, list, tuple)) else a
                     for a in args)
        return args, kwargs

    def state_dict(self) -> Any:
        return to_json_tree(self.impl.state_dict())

    def load_state_dict(self, state: Any) -> None:
        state = from_json_tree(state)
        if self.impl.sampler is None and "data_sampler" in state:
            # no training loader yet (initialize() without training_data): apply it when deepspeed_io builds one
            state = dict(state)
            self._pending_sampler_state = state.pop("data_sampler")
        self.impl.load_state_dict(state)


class CompressionHook:
    """ds_compression's compression-aware training: init on the model, a scheduler stepped per step."""

    def __init__(self, raw_config: dict[str, Any], model: torch.nn.Module) -> None:
        pkg = _import("ds_compression", "ds-compression", "compression_training")
        init = getattr(pkg, "init_compression", None)
        scheduler_cls = getattr(pkg, "CompressionScheduler", None)
        if init is None or scheduler_cls is None:
            raise ConfigError(
                "config section 'compression_training': the installed ds-compression does not provide "
                "init_compression/CompressionScheduler yet; upgrade ds-compression or remove the section"
            )
        model_out = init(model, raw_config)
        if model_out is not None and model_out is not model:
            raise ConfigError("ds_compression.init_compression must modify the model in place for ds-train")
        self.scheduler = scheduler_cls(model, raw_config)
        self.scheduler.step(0)  # techniques with schedule_offset 0 are on from the first step

    def step(self, global_step: int) -> None:
        """After each applied optimizer step, with the new global step (ds-compression's contract)."""
        self.scheduler.step(global_step)


def to_json_tree(value: Any) -> Any:
    """Plain Python/torch state -> JSON-able (tensors tagged), for hooks' checkpoint state."""
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, dict):
        return {str(k): to_json_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_tree(v) for v in value]
    return value


def from_json_tree(value: Any) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return torch.tensor(value["__tensor__"], dtype=getattr(torch, value["dtype"]))
        return {k: from_json_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_tree(v) for v in value]
    return value
