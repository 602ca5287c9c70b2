"""The training engine: the micro-step loop around a ZeRO strategy (DeepSpeed's engine API).

Usage is DeepSpeed's: call ``engine(batch)``, ``engine.backward(loss)`` and ``engine.step()`` for
every micro batch; the optimizer runs on every ``gradient_accumulation_steps``-th call of step().
Where parameters, gradients and optimizer state live is the strategy's business (`ds_train.zero`).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union

import torch
from ds_core import comm
from ds_core.accelerator import get_accelerator
from ds_core.config import ConfigError
from ds_core.logging import log_dist, logger
from ds_core.utils import SynchronizedWallClockTimer, memory_report

from ds_train.checkpoint.format import CheckpointError, read_latest
from ds_train.checkpoint.reader import CheckpointReader
from ds_train.checkpoint.writer import check_json, write_checkpoint
from ds_train.config import TrainConfig, resolve_batch_sizes
from ds_train.dataloader import DSDataLoader
from ds_train.monitor import Monitors
from ds_train.optim import Lamb, build_optimizer, is_elementwise
from ds_train.precision import build_loss_scaler, dtype_from_name, model_dtype
from ds_train.schedulers import build_scheduler
from ds_train.zero import StepResult, strategy_class

__all__ = ["DeepSpeedEngine"]

OptimizerArg = Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer], None]  # noqa: UP007 - runtime alias, py39


def _rebind_client_optimizer(client: torch.optim.Optimizer, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Point a user's optimizer at the engine's master parameters, keeping its class and hyperparameters."""
    client.param_groups = []
    client.state.clear()
    for g in groups:
        client.add_param_group(g)
    return client


class DeepSpeedEngine(torch.nn.Module):
    """Wraps `model` for distributed mixed-precision training; build it with `ds_train.initialize`."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        raw_config: dict[str, Any],
        optimizer: OptimizerArg = None,
        model_parameters: Any = None,
        training_data: Any = None,
        lr_scheduler: Any = None,
        collate_fn: Callable | None = None,
        train_iters: int | None = None,
    ) -> None:
        """`train_iters`: the run's length in optimizer steps, for schedules that need it (ds-data's
        layer-token LR); without it the length is the scheduler's ``total_num_steps`` when configured."""
        super().__init__()
        self._config = config
        self.acc = get_accelerator()
        self.world_size = comm.get_world_size() if comm.is_initialized() else 1
        self.global_rank = comm.get_rank() if comm.is_initialized() else 0
        self.local_rank = comm.get_local_rank() if comm.is_initialized() else 0
        self.dp_world_size = self.world_size
        resolve_batch_sizes(config, self.dp_world_size)
        config.assert_no_auto("ds_train config")
        self.device = torch.device(self.acc.current_device_name() if self.acc.name != "cpu" else "cpu")
        self.dtype = model_dtype(config.fp16_enabled, config.bf16_enabled)
        if config.fp16_enabled and self.acc.name == "cpu":
            logger.info("fp16 on CPU: supported here (loss scaling included), but slow; bf16 is the CPU choice")

        # optional packages change the model before it is flattened
        self.data_efficiency = None
        if config.curriculum_learning is not None or config.data_efficiency is not None:
            from ds_train.integrations import DataEfficiencyHook

            self.data_efficiency = DataEfficiencyHook(raw_config, model, config.train_batch_size, self.global_rank,
                                                      train_iters=self._training_length(config, train_iters))
        self.compression = None
        if config.compression_training is not None:
            from ds_train.integrations import CompressionHook

            self.compression = CompressionHook(raw_config, model)

        model.to(device=self.device, dtype=self.dtype)
        self.module = model
        groups = self._param_groups(model, optimizer, model_parameters)
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for g in groups for i, p in enumerate(g["params"]) if id(p) not in names]
        if missing:
            raise ValueError("optimizer / model_parameters hold tensors that are not parameters of the model")

        zc = config.zero_optimization
        offload = zc.offload_optimizer_device in ("cpu", "nvme")  # nvme: the CPU Adam kernel streams chunks
        make_optimizer, elementwise = self._optimizer_factory(optimizer, offload)
        # Lamb's per-tensor trust ratio is made exact at stages 1/2 (norms summed over shards, optim/lamb.py)
        lamb = isinstance(optimizer, Lamb) or (optimizer is None and config.optimizer is not None
                                                and config.optimizer.type.lower() == "lamb")
        if zc.stage >= 1 and not elementwise and not (lamb and zc.stage in (1, 2)) \
                and not config.zero_allow_untested_optimizer:
            raise ConfigError(
                f"ZeRO stage {zc.stage} shards the optimizer over flat buffers, which is exact only for "
                "elementwise optimizers (Adam, AdamW, SGD, Adagrad, Lion) and, at stages 1 and 2, Lamb; this "
                "optimizer is not. Use a lower stage, or set zero_allow_untested_optimizer=true to accept it."
            )
        grad_dtype = dtype_from_name(config.data_types.grad_accum_dtype) if config.data_types.grad_accum_dtype \
            else self.dtype
        comm_dtype = dtype_from_name(config.communication_data_type) if config.communication_data_type else None
        self.strategy = strategy_class(zc.stage)(
            groups, names, make_optimizer,
            stage=zc.stage, dtype=self.dtype, grad_dtype=grad_dtype, comm_dtype=comm_dtype, device=self.device,
            bucket_size=zc.reduce_bucket_size, allgather_bucket_size=zc.allgather_bucket_size,
            overlap_comm=True if zc.overlap_comm is None else zc.overlap_comm,
            reduce_scatter=zc.reduce_scatter, allgather_partitions=zc.allgather_partitions,
            offload_optimizer=offload,
            pin_memory=bool(zc.offload_optimizer and zc.offload_optimizer.pin_memory),
            elementwise=elementwise, predivide_factor=config.gradient_predivide_factor,
            prescale_gradients=config.prescale_gradients,
            ignore_unused_parameters=zc.ignore_unused_parameters,
            **({"model": model, "zero_config": zc, "aio_config": config.aio} if zc.stage == 3 else {}),
        )
        self._broadcast_non_flat(model)
        self.optimizer = self.strategy.optimizer
        self.lr_scheduler = self._build_scheduler(lr_scheduler)
        self.loss_scaler = build_loss_scaler(config.fp16)
        self.training_dataloader = self.deepspeed_io(training_data, collate_fn=collate_fn) \
            if training_data is not None else None

        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._grad_norm: float | None = None
        self._step_applied = False
        self._in_no_sync = False
        self._losses: list[float] = []
        self._last_print = time.perf_counter()
        self._samples_since_print = 0
        self.timers = SynchronizedWallClockTimer()
        self.monitors = Monitors(config, self.global_rank)
        if config.comms_logger.enabled:
            comm.comms_logger.configure(enabled=True, verbose=config.comms_logger.verbose,
                                        prof_all=config.comms_logger.prof_all, debug=config.comms_logger.debug,
                                        prof_ops=config.comms_logger.prof_ops)
        if config.dump_state:
            log_dist(f"ds_train config: {config.model_dump_json(indent=1)}")
        log_dist(
            f"ds_train engine: {self.strategy.describe()}, dtype {str(self.dtype).replace('torch.', '')}, "
            f"world {self.dp_world_size}, micro batch {config.train_micro_batch_size_per_gpu}, "
            f"grad accumulation {config.gradient_accumulation_steps}, optimizer {type(self.optimizer).__name__}"
            + (", optimizer offloaded to CPU" if offload else "")
        )

    # -- construction helpers ------------------------------------------------------------------------
    @staticmethod
    def _param_groups(model: torch.nn.Module, optimizer: OptimizerArg, model_parameters: Any) -> list[dict]:
        if isinstance(optimizer, torch.optim.Optimizer):
            raw = [dict(g) for g in optimizer.param_groups]
        elif model_parameters is not None:
            items = list(model_parameters)
            if items and isinstance(items[0], dict):
                raw = [dict(g) for g in items]
            elif items and isinstance(items[0], tuple):  # named_parameters()
                raw = [{"params": [p for _, p in items]}]
            else:
                raw = [{"params": items}]
        else:
            raw = [{"params": list(model.parameters())}]
        seen: set[int] = set()
        groups = []
        for g in raw:
            params = []
            for p in g["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            if params:
                groups.append({**g, "params": params})
        if not groups:
            raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
        return groups

    def _optimizer_factory(self, optimizer: OptimizerArg, offload: bool) -> tuple[Callable, bool]:
        cfg = self._config.optimizer
        if isinstance(optimizer, torch.optim.Optimizer):
            if cfg is not None:
                raise ConfigError("an optimizer was passed to initialize() and the config has an 'optimizer' section; "
                                  "give only one")
            if offload and self._config.zero_force_ds_cpu_optimizer:
                from ds_kernels.optim import DSCPUAdagrad, DSCPUAdam, DSCPULion

                if not isinstance(optimizer, (DSCPUAdam, DSCPUAdagrad, DSCPULion)):
                    raise ConfigError(
                        "offload_optimizer=cpu with a client optimizer needs a ds-kernels CPU optimizer "
                        "(ds_kernels.optim.DSCPUAdam/DSCPUAdagrad/DSCPULion), or set zero_force_ds_cpu_optimizer=false"
                    )
            return (lambda groups: _rebind_client_optimizer(optimizer, groups)), is_elementwise(optimizer)
        if callable(optimizer):
            # unknown class: stage 0 keeps whole tensors (always exact); stage >= 1 checks after building
            return optimizer, self._config.zero_stage >= 1
        if cfg is None:
            raise ConfigError("no optimizer: add an 'optimizer' section to the config or pass optimizer= to initialize()")
        if cfg.legacy_fusion:
            raise ConfigError("optimizer.legacy_fusion=true is not supported")
        elementwise = cfg.type.lower() != "lamb"
        return (lambda groups: build_optimizer(cfg.type, cfg.params, groups, offload=offload)), elementwise

    def _broadcast_non_flat(self, model: torch.nn.Module) -> None:
        """Frozen parameters and buffers start equal on every rank, as the trainable ones do (ZeRO-3's
        partitioned frozen parameters are already consistent: their pieces were cut from one source)."""
        if self.dp_world_size == 1:
            return
        for t in list(model.buffers()) + [p for p in model.parameters() if not p.requires_grad and not hasattr(p, "ds3")]:
            comm.broadcast(t.data, 0)

    def _build_scheduler(self, lr_scheduler: Any) -> Any:
        cfg = self._config.scheduler
        if lr_scheduler is not None and cfg is not None:
            raise ConfigError("an lr_scheduler was passed to initialize() and the config has a 'scheduler' section; "
                              "give only one")
        if lr_scheduler is not None:
            return lr_scheduler(self.optimizer) if callable(lr_scheduler) and not hasattr(lr_scheduler, "step") \
                else lr_scheduler
        if cfg is not None:
            return build_scheduler(cfg.type, cfg.params, self.optimizer)
        return None

    @staticmethod
    def _training_length(config: TrainConfig, train_iters: int | None) -> int | None:
        """Optimizer steps of the whole run: given, or the LR schedule's ``total_num_steps`` (WarmupDecayLR,
        WarmupCosineLR); None when neither says (ds-data then asks for total_layer_tokens)."""
        if train_iters is not None:
            if int(train_iters) < 1:
                raise ValueError(f"train_iters={train_iters}: the training length must be at least 1 step")
            return int(train_iters)
        total = config.scheduler.params.get("total_num_steps") if config.scheduler is not None else None
        return int(total) if total is not None and not isinstance(total, str) else None

    def deepspeed_io(self, dataset: Any, batch_size: int | None = None, collate_fn: Callable | None = None,
                     num_local_io_workers: int = 0, route: Any = None,
                     data_sampler: Any = None) -> DSDataLoader | torch.utils.data.DataLoader:
        """A data loader giving this rank its share of `dataset`, micro batch by micro batch.

        With a data_efficiency curriculum over analyzed metrics it is ds-data's loader (the curriculum
        picks each step's samples; its position is checkpointed with the data_efficiency state).
        """
        if data_sampler is not None:
            raise ValueError("deepspeed_io(data_sampler=...) is not supported; the engine's loader shards itself")
        micro_batch = batch_size or self._config.train_micro_batch_size_per_gpu
        dp_rank = self.global_rank if self.dp_world_size > 1 else 0
        if self.data_efficiency is not None and self.data_efficiency.needs_data_sampler:
            return self.data_efficiency.build_data_loader(
                dataset, micro_batch, dp_rank, self.dp_world_size, self.gradient_accumulation_steps(),
                collate_fn, num_local_io_workers,
            )
        return DSDataLoader(
            dataset, micro_batch, dp_rank, self.dp_world_size, collate_fn=collate_fn,
            drop_last=self._config.dataloader_drop_last, seed=self._config.seed or 0, num_workers=num_local_io_workers,
        )

    # -- config getters (DeepSpeed names) ---------------------------------------------------------------
    @property
    def config(self) -> TrainConfig:
        return self._config

    def train_batch_size(self) -> int:
        return int(self._config.train_batch_size)

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self._config.train_micro_batch_size_per_gpu)

    def gradient_accumulation_steps(self) -> int:
        return int(self._config.gradient_accumulation_steps)

    def gradient_clipping(self) -> float:
        return float(self._config.gradient_clipping)

    def zero_optimization_stage(self) -> int:
        return self.strategy.stage

    def fp16_enabled(self) -> bool:
        return self._config.fp16_enabled

    def bfloat16_enabled(self) -> bool:
        return self._config.bf16_enabled

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_mom(self) -> list[Any]:
        return [g.get("betas", g.get("momentum")) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm of the last applied step (unscaled, before clipping)."""
        return self._grad_norm

    @property
    def cur_scale(self) -> float:
        return self.loss_scaler.loss_scale

    def was_step_applied(self) -> bool:
        return self._step_applied

    def get_data_parallel_rank(self) -> int:
        return self.global_rank

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    # -- the step -----------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.wall_clock_breakdown:
            self.timers("forward").start()
        if self.data_efficiency is not None:
            if self.micro_steps % self.gradient_accumulation_steps() == 0:
                self.data_efficiency.on_step_begin(self.global_steps, self.optimizer)
            args, kwargs = self.data_efficiency.transform(args, kwargs)
        if self._config.fp16.auto_cast:
            args, kwargs = _cast_floats((args, kwargs), self.dtype)
        with self.strategy.forward_context():
            out = self.module(*args, **kwargs)
        if self.wall_clock_breakdown:
            self.timers("forward").stop()
        return out

    @property
    def wall_clock_breakdown(self) -> bool:
        return self._config.wall_clock_breakdown

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of `loss` (divided by the accumulation steps, times the fp16 loss scale)."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("engine.backward(loss) needs a scalar loss tensor")
        if self.wall_clock_breakdown:
            self.timers("backward").start()
        self._losses.append(float(loss.detach().float().item()))
        scaled = loss.float()
        if scale_wrt_gas and self.gradient_accumulation_steps() > 1:
            scaled = scaled / self.gradient_accumulation_steps()
        if self.loss_scaler.loss_scale != 1.0:
            scaled = scaled * self.loss_scaler.loss_scale
        sync = self.is_gradient_accumulation_boundary() and not self._in_no_sync
        self.strategy.before_backward(sync)
        scaled.backward(retain_graph=retain_graph)
        self.strategy.after_backward()
        if self.wall_clock_breakdown:
            self.timers("backward").stop()
        return loss

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient reduction inside (stages 0/1; the boundary step must be outside)."""
        if self.strategy.stage >= 2:
            raise RuntimeError(f"no_sync() is not supported with ZeRO stage {self.strategy.stage}: gradients are "
                               "partitioned and reduced on every micro step")
        self._in_no_sync = True
        try:
            yield
        finally:
            self._in_no_sync = False

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """Call after every micro batch; the optimizer runs at accumulation boundaries."""
        self._step_applied = False
        if self.is_gradient_accumulation_boundary():
            if self._in_no_sync:
                raise RuntimeError("engine.step() at an accumulation boundary inside no_sync(): the gradients were "
                                   "never reduced; leave no_sync() for the last micro batch")
            if self.wall_clock_breakdown:
                self.timers("step").start()
            result = self.strategy.step(self.loss_scaler.loss_scale, self.gradient_clipping(),
                                        check_overflow=self._config.fp16_enabled)
            self._after_optimizer_step(result, lr_kwargs)
            if self.wall_clock_breakdown:
                self.timers("step").stop()
        self.micro_steps += 1

    def _after_optimizer_step(self, result: StepResult, lr_kwargs: dict[str, Any] | None) -> None:
        self.loss_scaler.update_scale(result.overflow)
        if result.overflow:
            self.skipped_steps += 1
            log_dist(f"step {self.global_steps + 1}: fp16 overflow, step skipped; loss scale now "
                     f"{self.loss_scaler.loss_scale:g}", ranks=[0])
        else:
            self._step_applied = True
            self._grad_norm = result.grad_norm
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        self.global_steps += 1
        if self.compression is not None and not result.overflow:
            self.compression.step(self.global_steps)
        self.global_samples += self.train_batch_size()
        self._samples_since_print += self.train_batch_size()
        self._report()

    def _report(self) -> None:
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._losses = []
        if self.monitors.enabled:
            events = [("Train/Samples/train_loss", loss, self.global_samples),
                      ("Train/Samples/lr", self.get_lr()[0], self.global_samples)]
            if self._config.fp16_enabled:
                events.append(("Train/Samples/loss_scale", self.loss_scaler.loss_scale, self.global_samples))
            self.monitors.write(events)
        every = self._config.steps_per_print
        if not every or self.global_steps % every:
            return
        now = time.perf_counter()
        rate = self._samples_since_print / max(now - self._last_print, 1e-9)
        self._last_print, self._samples_since_print = now, 0
        parts = [f"step {self.global_steps}", f"loss {loss:.4f}", f"lr {self.get_lr()[0]:.3e}"]
        if self._grad_norm is not None:
            parts.append(f"grad_norm {self._grad_norm:.3f}")
        if self._config.fp16_enabled:
            parts.append(f"loss_scale {self.loss_scaler.loss_scale:g} skipped {self.skipped_steps}")
        parts.append(f"samples/s {rate:.1f}")
        if self._config.memory_breakdown:
            parts.append(str(memory_report()))
        log_dist(" | ".join(parts), ranks=[0])
        if self.wall_clock_breakdown:
            log_dist(self.timers.format(["forward", "backward", "step"]), ranks=[0])

    def zero_grad(self) -> None:
        self.strategy.zero_grad()

    # -- checkpoints -------------------------------------------------------------------------------------
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

    def destroy(self) -> None:
        """Release hooks and buffers (the engine cannot be used afterwards)."""
        for h in getattr(self.strategy, "_hooks", []):
            h.remove()
        if hasattr(self.strategy, "destroy"):
            self.strategy.destroy()  # ZeRO-3: also closes the NVMe swap folder


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast_floats(v, dtype) for v in obj)
    return obj


def _dedup_shared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state.items():
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v
    return out
