"""The contract between the engine and a ZeRO implementation.

The engine owns the loop (micro steps, loss scaling, the LR schedule, logging, checkpoint files);
a strategy owns where parameters, gradients and optimizer state live and how they move. A new
stage (ZeRO-3, parameter offload) implements this class and is picked in `zero/__init__.py`; the
engine does not change.

Call order per optimizer step, with A = gradient_accumulation_steps:
  A x [ forward_context() -> forward ; before_backward(sync) ; loss.backward() ; after_backward() ]
  step(...)  (only after the A-th micro step; `sync` is True on that one unless no_sync())
"""
from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from ds_core import comm

from ds_train.zero.partition import GroupLayout

__all__ = ["StepResult", "ShardReader", "ZeroStrategy", "grad_divisor"]


@dataclass
class StepResult:
    """What one `step` did: skipped for overflow or not, and the global grad norm (unscaled, pre-clip)."""

    overflow: bool
    grad_norm: float | None


def pick_collectives(group: Any, reduce_scatter: bool | None, allgather_partitions: bool | None) -> tuple[str, bool]:
    """(how gradients are reduced, all-gather parameters?) from the config's switches.

    The reduction is "reduce_scatter" (the backend's collective), "sends" (a reduce-scatter by
    point-to-point messages, `comm.reduce_scatter_by_sends`) or "all_reduce" (`reduce_scatter=false`, as
    in DeepSpeed). Unset means the backend's faster way on buffers the strategy owns: the native
    collectives, except where `comm.prefers_point_to_point` (gloo) says sends and per-rank broadcasts win."""
    p2p = comm.prefers_point_to_point(group)
    if reduce_scatter is None:
        reduce = "sends" if p2p else "reduce_scatter"
    else:
        reduce = "reduce_scatter" if reduce_scatter else "all_reduce"
    return reduce, (not p2p) if allgather_partitions is None else allgather_partitions


def grad_divisor(norm: float, loss_scale: float, clip_norm: float) -> float:
    """What every stage divides its gradients by: the loss scale, times the clip factor when the
    unscaled global norm exceeds `clip_norm` (DeepSpeed's 1e-6 guard included)."""
    clip = (norm + 1e-6) / clip_norm if clip_norm > 0 else 1.0
    return loss_scale * clip if clip > 1 else loss_scale


class ShardReader(abc.ABC):
    """Read access to a saved checkpoint's optimizer shards, independent of the saving world size."""

    @abc.abstractmethod
    def group_count(self) -> int: ...

    @abc.abstractmethod
    def param_names(self, group: int) -> list[str]: ...

    @abc.abstractmethod
    def state_keys(self, group: int) -> list[str]:
        """Sharded tensor keys saved for `group` ("fp32" for master weights, optimizer state names)."""

    @abc.abstractmethod
    def full_tensors(self, group: int, key: str) -> dict[str, torch.Tensor]:
        """Parameter name -> the whole (unsharded) fp32 tensor of `key`, regathered from every shard."""

    @abc.abstractmethod
    def group_meta(self, group: int) -> dict[str, Any]:
        """JSON metadata the strategy saved for `group` (hyperparameters, scalar optimizer state)."""


class ZeroStrategy(abc.ABC):
    """Where model states live and how gradients and parameters move between ranks."""

    #: ZeRO stage number, reported by engine.zero_optimization_stage()
    stage: int
    #: the torch optimizer over this rank's master parameters (its param_groups carry lr, betas, ...)
    optimizer: torch.optim.Optimizer

    # -- the training step -----------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        """Wraps forward (ZeRO-3 gathers parameters here); stages <= 2 need nothing."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def before_backward(self, sync: bool) -> None:
        """Arm the gradient hooks; `sync` says whether gradients are reduced during this backward."""

    @abc.abstractmethod
    def after_backward(self) -> None:
        """Finish (wait for) every reduction this backward started."""

    @abc.abstractmethod
    def step(self, loss_scale: float, clip_norm: float, check_overflow: bool) -> StepResult:
        """Unscale, clip, update the master weights, refresh the model's parameters, clear gradients."""

    @abc.abstractmethod
    def zero_grad(self) -> None:
        """Drop accumulated gradients (engine.zero_grad())."""

    # -- parameters --------------------------------------------------------------------------------
    @abc.abstractmethod
    def full_fp32_params(self) -> dict[str, torch.Tensor]:
        """Name -> whole fp32 master parameter, gathered on every rank (a collective)."""

    @abc.abstractmethod
    def sync_master_from_params(self) -> None:
        """Re-derive the master weights from the module's parameters (after the module was loaded)."""

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        """Inside, every rank's module holds whole parameters (ZeRO-3 gathers; stages <= 2 always do)."""
        yield

    # -- checkpoints ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def layouts(self) -> list[GroupLayout]:
        """One layout per param group: how shards map to parameters (saved in the manifest)."""

    @abc.abstractmethod
    def shard_index(self) -> int | None:
        """Which shard this rank writes (None: this rank holds no unique optimizer state)."""

    @abc.abstractmethod
    def shard_state(self) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """This rank's sharded tensors ("g{i}.{key}", CPU) and per-group JSON metadata."""

    @abc.abstractmethod
    def load_shard_state(self, reader: ShardReader, load_optimizer_states: bool) -> None:
        """Restore master weights (and optimizer state) from any saved world size; refresh params."""

    def model_state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The tensors this rank holds for model states, by kind ("params", "grads", "master",
        "optimizer"); used for memory reports and the ZeRO memory benchmark."""
        raise NotImplementedError(f"{type(self).__name__} does not report its model-state tensors")

    def describe(self) -> str:
        return f"ZeRO stage {self.stage}"


StrategyFactory = Callable[..., ZeroStrategy]
