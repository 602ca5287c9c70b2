"""The training engine: the micro-step loop around a ZeRO strategy (DeepSpeed's engine API).

Usage is DeepSpeed's: call ``engine(batch)``, ``engine.backward(loss)`` and ``engine.step()`` for
every micro batch; the optimizer runs on every ``gradient_accumulation_steps``-th call of step().
Where parameters, gradients and optimizer state live is the strategy's business (`ds_train.zero`);
what is built before the first step is in `engine_setup`, checkpoint save/load in `engine_checkpoint`.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from ds_core import comm
from ds_core.accelerator import get_accelerator
from ds_core.logging import log_dist, logger
from ds_core.utils import SynchronizedWallClockTimer, memory_report

from ds_train.config import TrainConfig, resolve_batch_sizes
from ds_train.dataloader import DSDataLoader
from ds_train.engine_checkpoint import EngineCheckpointMixin
from ds_train.engine_setup import (
    OptimizerArg,
    broadcast_non_flat,
    build_lr_scheduler,
    check_optimizer_shardable,
    optimizer_factory,
    param_groups,
    training_length,
)
from ds_train.monitor import Monitors
from ds_train.precision import build_loss_scaler, dtype_from_name, model_dtype
from ds_train.zero import StepResult, strategy_class

__all__ = ["DeepSpeedEngine"]


class DeepSpeedEngine(EngineCheckpointMixin, torch.nn.Module):
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
                                                      train_iters=training_length(config, train_iters))
        self.compression = None
        if config.compression_training is not None:
            from ds_train.integrations import CompressionHook

            self.compression = CompressionHook(raw_config, model)

        model.to(device=self.device, dtype=self.dtype)
        self.module = model
        groups = param_groups(model, optimizer, model_parameters)
        names = {id(p): n for n, p in model.named_parameters()}
        missing = [i for g in groups for i, p in enumerate(g["params"]) if id(p) not in names]
        if missing:
            raise ValueError("optimizer / model_parameters hold tensors that are not parameters of the model")

        zc = config.zero_optimization
        offload = zc.offload_optimizer_device in ("cpu", "nvme")  # nvme: the CPU Adam kernel streams chunks
        make_optimizer, elementwise = optimizer_factory(config, optimizer, offload)
        check_optimizer_shardable(config, optimizer, elementwise)
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
        broadcast_non_flat(model, self.dp_world_size)
        self.optimizer = self.strategy.optimizer
        self.lr_scheduler = build_lr_scheduler(config, lr_scheduler, self.optimizer)
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
