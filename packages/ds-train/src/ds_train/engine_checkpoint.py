"""Checkpoint glue of the training engine: what `DeepSpeedEngine` saves and restores beside the strategy.

The file format (safetensors + JSON, atomic writes, resharding on load) lives in `ds_train.checkpoint`;
this mixin gathers the engine's own counters, the scheduler, loss scaler and data loader position for
it, puts them back on load, and exports whole weights (`save_16bit_model`, the fp32 master weights).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ds_core.logging import log_dist, logger

from ds_train.checkpoint.format import CheckpointError, read_latest
from ds_train.checkpoint.reader import CheckpointReader
from ds_train.checkpoint.writer import check_json, write_checkpoint
from ds_train.config import TrainConfig
from ds_train.dataloader import DSDataLoader

__all__ = ["EngineCheckpointMixin"]


class EngineCheckpointMixin:
    """`DeepSpeedEngine`'s checkpoint methods. They read the engine's attributes declared below and call
    its `gradient_accumulation_steps()` and `train_batch_size()`; the mixin is not used on its own."""

    _config: TrainConfig
    module: torch.nn.Module
    strategy: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loss_scaler: Any
    training_dataloader: Any
    data_efficiency: Any
    dtype: torch.dtype
    dp_world_size: int
    global_rank: int
    global_steps: int
    global_samples: int
    micro_steps: int
    skipped_steps: int

    def _engine_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "global_steps": self.global_steps,
            "global_samples": self.global_samples,
            "micro_steps": self.micro_steps,
            "gradient_accumulation_steps": self.gradient_accumulation_steps(),
            "skipped_steps": self.skipped_steps,
            "dp_world_size": self.dp_world_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "optimizer_class": type(self.optimizer).__name__,
            "loss_scaler": self.loss_scaler.state_dict(),
            "lr_scheduler": self._scheduler_state(),
            # ds-data's curriculum loader keeps its position in the data_efficiency state instead
            "dataloader": self.training_dataloader.state_dict()
            if isinstance(self.training_dataloader, DSDataLoader) else None,
            "data_efficiency": self.data_efficiency.state_dict() if self.data_efficiency is not None else None,
        }
        return state

    def _scheduler_state(self) -> Any:
        if self.lr_scheduler is None:
            return None
        state = self.lr_scheduler.state_dict()
        check_json(state, "lr_scheduler.state_dict()")
        return state

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Save model, optimizer shards, scheduler, loss scaler, loader position and `client_state`."""
        if exclude_frozen_parameters:
            raise ValueError("save_checkpoint(exclude_frozen_parameters=True) is not supported yet")
        tag = tag if tag is not None else f"global_step{self.global_steps}"
        path = write_checkpoint(
            save_dir, str(tag), strategy=self.strategy, module=self.module, engine_state=self._engine_state(),
            client_state=dict(client_state or {}), save_latest=save_latest,
            tag_validation=self._config.checkpoint.tag_validation,
        )
        log_dist(f"saved checkpoint {path}", ranks=[0])
        return True

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, Any]:
        """Load a checkpoint saved on any data-parallel world size; returns (path, client_state).

        As DeepSpeed: with no tag and no ``latest`` file, warns and returns (None, None).
        """
        if custom_load_fn is not None:
            raise ValueError("load_checkpoint(custom_load_fn=...) is not supported")
        if tag is None and read_latest(Path(load_dir)) is None:
            logger.warning(f"load_checkpoint: no 'latest' file in {load_dir} and no tag given; nothing loaded")
            return None, None
        reader = CheckpointReader(load_dir, tag)  # verifies every file before anything changes
        self._load_module(reader, strict=load_module_strict)
        if load_module_only:
            self.strategy.sync_master_from_params()
        else:
            try:
                self.strategy.load_shard_state(reader, load_optimizer_states)
            except ValueError as exc:
                raise CheckpointError(f"{reader.path}: {exc}") from None
            self._load_engine_state(reader.engine_state, load_lr_scheduler_states)
        log_dist(f"loaded checkpoint {reader.path} (saved on {reader.engine_state.get('dp_world_size')} ranks)",
                 ranks=[0])
        return str(reader.path), reader.client_state

    def _load_module(self, reader: CheckpointReader, strict: bool) -> None:
        with self.strategy.gathered_params():  # ZeRO-3: whole parameters; in-place changes are kept
            self._load_module_gathered(reader, strict)

    def _load_module_gathered(self, reader: CheckpointReader, strict: bool) -> None:
        state = reader.module_state_dict()
        own = self.module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise CheckpointError(f"{reader.path}: the checkpoint does not match the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for name, t in state.items():
            if name in own and tuple(own[name].shape) != tuple(t.shape):
                raise CheckpointError(f"{reader.path}: '{name}' has shape {tuple(t.shape)} in the checkpoint, "
                                      f"{tuple(own[name].shape)} in the model")
        with torch.no_grad():
            for name, t in state.items():
                if name in own:
                    own[name].copy_(t)

    def _load_engine_state(self, state: dict[str, Any], load_lr_scheduler_states: bool) -> None:
        self.global_steps = int(state.get("global_steps", 0))
        self.global_samples = int(state.get("global_samples", 0))
        self.micro_steps = self._resumed_micro_steps(int(state.get("micro_steps", 0)),
                                                     state.get("gradient_accumulation_steps"))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if state.get("loss_scaler"):
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        if load_lr_scheduler_states and self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if isinstance(self.training_dataloader, DSDataLoader) and state.get("dataloader"):
            saved = state["dataloader"]
            if "consumed_samples" not in saved and state.get("dp_world_size") != self.dp_world_size:
                logger.warning("data loader position not restored: the checkpoint (from before the global sample "
                               f"count was recorded) was saved on {state.get('dp_world_size')} ranks, this run has "
                               f"{self.dp_world_size}")
            else:
                # continues at the saved global sample count, also on another world size (see dataloader.py)
                self.training_dataloader.load_state_dict(saved)
                consumed = self.training_dataloader.sampler.consumed_samples
                if consumed % self.train_batch_size():
                    logger.warning(
                        f"data loader resumed at global sample {consumed} of its epoch, not a multiple of this run's "
                        f"train_batch_size={self.train_batch_size()}: the samples continue in the saved order, but "
                        "the optimizer steps group them differently from a run started with this batch size"
                    )
        if self.data_efficiency is not None and state.get("data_efficiency") is not None:
            self.data_efficiency.load_state_dict(state["data_efficiency"])

    def _resumed_micro_steps(self, micro_steps: int, saved_ga: int | None) -> int:
        """The micro step counter in this run's accumulation (it decides the boundaries), not the saver's.

        A checkpoint saved on another world size usually comes with another gradient_accumulation_steps
        for the same global batch; keeping the saver's count would misplace every boundary after it.
        """
        ga = self.gradient_accumulation_steps()
        if saved_ga is None or int(saved_ga) == ga:
            return micro_steps
        boundaries, within = divmod(micro_steps, int(saved_ga))
        if within:
            logger.warning(f"checkpoint saved after micro step {within} of {saved_ga} of an accumulation: this run "
                           f"(gradient_accumulation_steps={ga}) starts its next accumulation from the beginning")
        return boundaries * ga

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """The module's weights in the training dtype, one file (.safetensors, or torch.save otherwise)."""
        zc = self._config.zero_optimization
        if zc.stage == 3 and not zc.stage3_gather_16bit_weights_on_model_save:
            logger.warning("save_16bit_model: not saved, stage 3 needs "
                           "zero_optimization.stage3_gather_16bit_weights_on_model_save=true (as in DeepSpeed)")
            return False
        with self.strategy.gathered_params():
            state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                     if not exclude_frozen_parameters or k not in self._frozen_names()}
        if self.global_rank != 0:
            return True
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{save_filename}.tmp"
        if save_filename.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(_dedup_shared(state), str(tmp))
        else:
            torch.save(state, tmp)
        tmp.replace(out / save_filename)
        return True

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict:
        """Whole weights in the training dtype on rank 0 ({} elsewhere); a collective (accelerate calls it)."""
        frozen = self._frozen_names() if exclude_frozen_parameters else set()
        with self.strategy.gathered_params():
            state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()
                     if k not in frozen} if self.global_rank == 0 else {}
        return state

    def _frozen_names(self) -> set[str]:
        return {n for n, p in self.module.named_parameters() if not p.requires_grad}

    def get_fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 master weights by parameter name (collective: call on every rank)."""
        return self.strategy.full_fp32_params()


def _dedup_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out
