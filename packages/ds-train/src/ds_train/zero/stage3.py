"""ZeRO stage 3: parameters, gradients and optimizer state all partitioned over the data-parallel group.

The pieces: `stage3_params` (partition records, coalesced gather/release, where shards live),
`stage3_prefetch` (module hooks, recorded-order prefetch, saved-tensor hooks), `stage3_grads`
(ordered bucketed reduce-scatter), `stage3_state` (checkpoint shards, reshardable). This class wires
them to the engine's `ZeroStrategy` contract and runs the optimizer on the local fp32 shard: in
device memory, in host memory (offload_optimizer=cpu, the ds-kernels CPU Adam), or streamed from
NVMe files (offload_optimizer=nvme). Model-dtype shards live in device memory, host memory
(offload_param=cpu) or an NVMe file (offload_param=nvme).

Per-rank model states: 2Ψ/N (bf16 gradient shard) + 4Ψ/N fp32 master + 8Ψ/N Adam moments = 14Ψ/N for
bf16: where the master lives in the memory the model-dtype shards would (no offload, or both offloaded
to host) the gathers read the master and cast it (`MasterTier`), so DeepSpeed's separate 2Ψ/N bf16
shard (its 16Ψ/N) exists only when the two are in different tiers (e.g. offload_param=nvme).
fp32 training: 4Ψ/N grads + 4Ψ/N master (= the shard) + 8Ψ/N Adam = 16Ψ/N.

Frozen parameters (requires_grad=False, in no optimizer group; built under zero.Init or handed over
whole) are partitioned too, in one extra tier group: 2Ψ_frozen/N per rank (bf16), no master, optimizer
state or gradient shard. They are gathered per module like the others and released after the module's
backward (`FrozenRelease`); checkpoints keep them in the module file (model_states), as DeepSpeed does.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from ds_core import comm
from ds_core.logging import log_dist

from ds_train.optim import is_elementwise, materialize_state
from ds_train.zero.chunked_step import (
    STEP_CHUNK,
    batch_by_size,
    chunk_size,
    nonfinite_flag,
    step_batch,
    sum_of_squares,
)
from ds_train.zero.partition import GroupLayout, build_layout
from ds_train.zero.stage3_grads import GradReducer, GradShards
from ds_train.zero.stage3_params import MasterTier, MemoryTier, ParamGatherer, Stage3Param
from ds_train.zero.stage3_prefetch import FrozenRelease, PrefetchCoordinator
from ds_train.zero.stage3_state import Stage3StateMixin
from ds_train.zero.strategy import StepResult, ZeroStrategy, grad_divisor, pick_collectives

__all__ = ["ZeroStage3", "Stage3Options"]

_STEP_CHUNK = STEP_CHUNK  # elements per optimizer call (see zero/chunked_step.py); tests shrink it here


@dataclass
class Stage3Options:
    """The stage-3 knobs (DeepSpeed's names and defaults; see `zero/stage3_config.py`)."""

    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    gather_16bit_weights_on_model_save: bool = False
    sub_group_size: int = 1_000_000_000
    offload_param: str = "none"  # none | cpu | nvme
    offload_optimizer: str = "none"
    param_nvme_path: str | None = None
    optimizer_nvme_path: str | None = None
    pin_memory: bool = False
    param_buffer_size: int = 100_000_000
    param_buffer_count: int = 5
    optimizer_buffer_count: int = 4
    aio_block_size: int = 1 << 20
    aio_queue_depth: int = 8
    aio_threads: int = 1

    @classmethod
    def from_config(cls, zc: Any, aio: Any = None) -> Stage3Options:
        """From a validated `ZeroConfig` (and the `aio` section) of the engine config."""
        op, oo = zc.offload_param, zc.offload_optimizer
        opts = cls(
            prefetch_bucket_size=zc.stage3_prefetch_bucket_size,
            max_live_parameters=zc.stage3_max_live_parameters,
            max_reuse_distance=zc.stage3_max_reuse_distance,
            param_persistence_threshold=zc.stage3_param_persistence_threshold,
            gather_16bit_weights_on_model_save=zc.stage3_gather_16bit_weights_on_model_save,
            sub_group_size=zc.sub_group_size,
            offload_param=op.device if op is not None else "none",
            offload_optimizer=oo.device if oo is not None else "none",
            param_nvme_path=op.nvme_path if op is not None else None,
            optimizer_nvme_path=oo.nvme_path if oo is not None else None,
            pin_memory=bool((op is not None and op.pin_memory) or (oo is not None and oo.pin_memory)),
            param_buffer_size=op.buffer_size if op is not None else 100_000_000,
            param_buffer_count=op.buffer_count if op is not None else 5,
            optimizer_buffer_count=oo.buffer_count if oo is not None else 4,
        )
        if aio is not None:
            opts.aio_block_size, opts.aio_queue_depth = aio.block_size, aio.queue_depth
            opts.aio_threads = aio.intra_op_parallelism
        return opts


class ZeroStage3(Stage3StateMixin, ZeroStrategy):
    """ZeRO-3 over `model`'s parameters in `param_groups` (see the module docstring)."""

    stage = 3

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        param_names: dict[int, str],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        *,
        model: torch.nn.Module,
        dtype: torch.dtype,
        grad_dtype: torch.dtype,
        comm_dtype: torch.dtype | None,
        device: torch.device,
        group: Any = None,
        bucket_size: int = 500_000_000,
        overlap_comm: bool = True,
        predivide_factor: float = 1.0,
        prescale_gradients: bool = False,
        ignore_unused_parameters: bool = True,
        options: Stage3Options | None = None,
        zero_config: Any = None,
        aio_config: Any = None,
        reduce_scatter: bool | None = None,
        allgather_partitions: bool | None = None,
        **_stage012_only: Any,  # the engine's stage 0-2 arguments (bucket sizes of stage 1/2's flat buffers)
    ) -> None:
        if options is None:
            options = Stage3Options.from_config(zero_config, aio_config) if zero_config is not None \
                else Stage3Options()
        self.options = opts = options
        self.model, self.group = model, group
        self.world = comm.get_world_size(group) if comm.is_initialized() else 1
        self.rank = comm.get_rank(group) if comm.is_initialized() else 0
        self.parts = self.world
        # gloo by default: each gradient bucket reduce-scattered by point-to-point sends, and one broadcast
        # per rank's piece of a gather (see pick_collectives)
        self.reduce, self.allgather_partitions = pick_collectives(group, reduce_scatter, allgather_partitions)
        self.dtype, self.device = dtype, device
        self.grad_dtype = grad_dtype
        self.ignore_unused = ignore_unused_parameters
        self.swap_folder = None
        self.nvme_optimizer = None
        if opts.offload_param == "nvme" and opts.offload_optimizer != "nvme":
            raise ValueError("offload_param.device='nvme' needs offload_optimizer.device='nvme' too "
                             "(as in DeepSpeed): the optimizer writes the updated shards to the same drive")

        # -- partition records ------------------------------------------------------------------------
        self.params: list[list[torch.nn.Parameter]] = [list(g["params"]) for g in param_groups]
        frozen = self._frozen_params(model, param_names)  # validated before anything changes
        self._layouts: list[GroupLayout] = []
        self.records: list[Stage3Param] = []
        initial: list[list[torch.Tensor]] = []  # per group: this rank's shard of each parameter
        for gi, params in enumerate(self.params):
            names = [param_names[id(p)] for p in params]
            self._layouts.append(self._layout_of(names, params))
            initial.append(self._adopt(params, names, self._layouts[gi], gi, self.records))
        # frozen parameters (requires_grad=False): partitioned and gathered for use like the trainable
        # ones, in one more tier group `frozen_group`, but with no master, optimizer state or gradient
        # shard. They live in `frozen_records`, out of `records`, so the reducer, grad hooks, the fp32
        # consolidation and the optimizer shard files never see them; checkpoints keep them in the
        # module file (as DeepSpeed's model states keep frozen weights).
        self.frozen_group = len(self.params)
        self.frozen_records: list[Stage3Param] = []
        self._frozen_layout: GroupLayout | None = None
        frozen_initial: list[torch.Tensor] = []
        if frozen:
            names = [n for n, _ in frozen]
            self._frozen_layout = self._layout_of(names, [p for _, p in frozen])
            frozen_initial = self._adopt([p for _, p in frozen], names, self._frozen_layout, self.frozen_group,
                                         self.frozen_records)

        # -- where the model-dtype shards live ---------------------------------------------------------
        sizes = [layout.shard_numel for layout in self._layouts]
        frozen_size = [self._frozen_layout.shard_numel] if self._frozen_layout is not None else []
        if "nvme" in (opts.offload_param, opts.offload_optimizer):
            from ds_train.offload.swap_folder import SwapFolder

            path = opts.optimizer_nvme_path or opts.param_nvme_path
            self.swap_folder = SwapFolder(path, comm.get_rank() if comm.is_initialized() else 0,
                                          block_size=opts.aio_block_size, queue_depth=opts.aio_queue_depth,
                                          threads=opts.aio_threads)
        host_master = opts.offload_optimizer in ("cpu", "nvme")
        # the master in the memory the shards would use (no offload, or both in host memory): the
        # shards are read from it, cast by the gather (MasterTier), instead of a second 2Ψ/N copy
        shared = opts.offload_optimizer != "nvme" and (opts.offload_param == "cpu") == host_master
        if opts.offload_param == "nvme":
            from ds_train.offload.nvme_params import NvmeParamTier

            largest = max((r.shard_numel for r in self.records + self.frozen_records), default=1)
            self.tier = NvmeParamTier(self.swap_folder, sizes + frozen_size, dtype, opts.param_buffer_size,
                                      largest, buffer_count=opts.param_buffer_count)
        elif shared:
            on_host = opts.offload_param == "cpu"
            where = torch.device("cpu") if on_host else device
            masters = MemoryTier(sizes, torch.float32, where, pin=on_host and opts.pin_memory).flats
            # frozen weights have no master: their flat shard is kept in the model dtype next to the masters
            frozen_flat = MemoryTier(frozen_size, dtype, where, pin=on_host and opts.pin_memory).flats
            self.tier = MasterTier(masters + frozen_flat)
        else:
            on_host = opts.offload_param == "cpu"
            self.tier = MemoryTier(sizes + frozen_size, dtype, torch.device("cpu") if on_host else device,
                                   pin=on_host and opts.pin_memory)
        for gi, shards in enumerate(initial):
            self._write_shards(gi, shards)
        if self._frozen_layout is not None:
            for si, shard in enumerate(frozen_initial):
                self._write_frozen(self._frozen_layout.buckets[si].shard_offset, shard)
            del frozen_initial

        # -- fp32 master shard and optimizer -----------------------------------------------------------
        self.master: list[torch.Tensor | None] = []
        if opts.offload_optimizer == "nvme":
            from ds_train.offload.nvme_optimizer import NvmeOptimizerSwapper

            chunk = min(opts.sub_group_size, max(sizes, default=1))
            self.nvme_optimizer = NvmeOptimizerSwapper(self.swap_folder, sizes, chunk, opts.optimizer_buffer_count)
            for gi, shards in enumerate(initial):  # piece by piece: the fp32 shard never exists whole here
                self.nvme_optimizer.init_group(gi, None)
                for si, shard in enumerate(shards):
                    offset = self._layouts[gi].buckets[si].shard_offset
                    self.nvme_optimizer.write_range(gi, "fp32", offset, shard.float())
                    shards[si] = None
            initial = []
        for gi, shards in enumerate(initial):
            # filled piece by piece: no second whole-shard temporary next to the master copy
            master = self.tier.flat(gi) if shared else \
                torch.empty(sizes[gi], dtype=torch.float32, device="cpu" if host_master else device)
            for si, shard in enumerate(shards):
                offset = self._layouts[gi].buckets[si].shard_offset
                master[offset : offset + shard.numel()].copy_(shard.reshape(-1))
                shards[si] = None  # the tier holds the model-dtype copy; drop this one now
            if opts.offload_optimizer == "cpu" and opts.pin_memory and not shared:
                from ds_core.accelerator import get_accelerator

                master = get_accelerator().pin_memory(master)
            self.master.append(master)
        del initial
        # (shard_lo, shard_hi) of each optimizer parameter: chunks (views) of the master shard, stepped a
        # batch at a time so the fp32 gradient copies and the update's temporaries are never shard-sized
        self._ranges: list[list[tuple[int, int]]] = [_chunk_ranges(n) for n in sizes]
        if self.nvme_optimizer is not None:
            # hyperparameters only: the state is on disk, streamed in chunks by the swapper
            self._opt_params = [[torch.zeros(0)] for _ in sizes]
            self.master = [None for _ in sizes]
        else:
            self._opt_params = [[m[lo:hi] for lo, hi in r] for m, r in zip(self.master, self._ranges)]
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": self._opt_params[gi]}
                  for gi, g in enumerate(param_groups)]
        self.optimizer = make_optimizer(groups)
        self._batches = self._step_batches(grad_dtype)
        if self.nvme_optimizer is not None:
            from ds_train.offload.nvme_optimizer import adam_hyper

            adam_hyper(self.optimizer, 0)  # refuses a non-Adam optimizer now, not at the first step
        else:
            materialize_state(self.optimizer)  # before the first forward, as stages 0-2 (optim/state_init.py)

        # -- gradients, hooks ---------------------------------------------------------------------------
        grad_device = torch.device("cpu") if host_master else device
        self.grad_shards = GradShards(sizes, grad_dtype, grad_device)
        self.gatherer = ParamGatherer(self.tier, dtype, device, group, allgather=self.allgather_partitions)
        self.coordinator = PrefetchCoordinator(
            model, self.gatherer, prefetch_bucket_size=opts.prefetch_bucket_size,
            max_live_parameters=opts.max_live_parameters, max_reuse_distance=opts.max_reuse_distance)
        self.reducer = GradReducer(self.records, self.grad_shards, bucket_size=bucket_size,
                                   comm_dtype=comm_dtype or grad_dtype, group=group, overlap=overlap_comm,
                                   predivide=predivide_factor, prescale=prescale_gradients,
                                   reduce=self.reduce)
        self._hooks = list(self.coordinator._hooks)
        self._hooks += [p.register_post_accumulate_grad_hook(self._on_grad) for ps in self.params for p in ps]
        # frozen weights get no gradient: released when the backward of the modules that read them is done
        self.frozen_release = FrozenRelease(self.coordinator, self.gatherer, self.frozen_records) \
            if any(not r.persistent for r in self.frozen_records) else None
        self._hooks += self.frozen_release.hooks if self.frozen_release is not None else []
        self._refresh_persistent()
        log_dist(f"ZeRO-3: {len(self.records)} parameters partitioned over {self.parts} ranks "
                 f"({sum(1 for r in self.records if r.persistent)} persistent) and {len(self.frozen_records)} "
                 f"frozen ones, offload param "
                 f"{opts.offload_param}, optimizer {opts.offload_optimizer}", ranks=[0])

    # -- setup helpers ---------------------------------------------------------------------------------
    def _initial_shard(self, p: torch.nn.Parameter, numel: int, shard_numel: int) -> torch.Tensor:
        """This rank's piece of `p`: from zero.Init's record, or cut from rank 0's whole tensor."""
        pre = getattr(p, "ds3", None)
        if pre is not None:  # built under zero.Init: already partitioned
            if pre.shard_numel != shard_numel or pre.init_shard is None:
                raise ValueError(f"parameter '{pre.name}' was partitioned by zero.Init for another world size")
            shard = pre.init_shard.to(self.dtype)
            pre.init_shard = None
            return shard
        full = p.detach().to(device=self.device, dtype=self.dtype).reshape(-1)
        if self.world > 1:  # rank 0's initial weights everywhere, as stages 0-2 do
            full = full.clone()
            comm.broadcast(full, comm.get_global_rank(self.group, 0) if self.group is not None else 0,
                           group=self.group)
        lo = self.rank * shard_numel
        shard = torch.zeros(shard_numel, dtype=self.dtype, device=self.device)
        piece = full[lo : min(lo + shard_numel, numel)]
        shard[: piece.numel()].copy_(piece)
        p.data = torch.empty(0, dtype=self.dtype, device=self.device)
        return shard

    def _frozen_params(self, model: torch.nn.Module,
                       param_names: dict[int, str]) -> list[tuple[str, torch.nn.Parameter]]:
        """The model's parameters in no optimizer group that are frozen (requires_grad=False)."""
        mine = {id(p) for ps in self.params for p in ps}
        frozen = []
        for name, p in model.named_parameters():
            if id(p) in mine:
                continue
            if p.requires_grad:
                if hasattr(p, "ds3"):  # partitioned by zero.Init: nothing would ever gather or train it
                    raise ValueError(f"parameter '{name}' was partitioned by zero.Init and requires grad but is "
                                     "in no optimizer param group: pass it to the optimizer or freeze it "
                                     "(requires_grad_(False))")
                continue  # trainable but not optimized: left whole, as at stages 0-2
            if not p.is_floating_point():  # integer "parameters" cannot take the model dtype: kept whole
                if hasattr(p, "ds3"):
                    from ds_train.zero.init import gather_init_param

                    gather_init_param(p, self.group)
                continue
            frozen.append((param_names.get(id(p), name), p))
        return frozen

    def _layout_of(self, names: list[str], params: list[torch.nn.Parameter]) -> GroupLayout:
        shapes = [tuple(p.ds3.shape) if hasattr(p, "ds3") else tuple(p.shape) for p in params]
        return build_layout(names, shapes, self.parts, bucket_size=1)  # one bucket per parameter

    def _adopt(self, params: list[torch.nn.Parameter], names: list[str], layout: GroupLayout, gi: int,
               records: list[Stage3Param]) -> list[torch.Tensor]:
        """Give each of `params` its record in group `gi` (appended to `records`); returns their shards."""
        shards = []
        for si, p in enumerate(params):
            slot, bucket = layout.slots[si], layout.buckets[si]
            shards.append(self._initial_shard(p, slot.numel, layout.piece_size(bucket)))
            rec = Stage3Param(p, slot.name, slot.shape, slot.numel, layout.piece_size(bucket), group=gi,
                              shard_offset=bucket.shard_offset,
                              persistent=slot.numel <= self.options.param_persistence_threshold)
            p.ds3 = rec
            p.ds_owner = self
            records.append(rec)
        return shards

    def _write_frozen(self, offset: int, values: torch.Tensor) -> None:
        """Store frozen weights: into the in-memory flat shard (a MasterTier's write stores nothing), or the tier."""
        flat = self.tier.flat(self.frozen_group)
        if flat is not None:
            flat[offset : offset + values.numel()].copy_(values.reshape(-1))
        else:
            self.tier.write_group(self.frozen_group, offset, values)

    def _write_shards(self, gi: int, shards: list[torch.Tensor]) -> None:
        layout = self._layouts[gi]
        for si, shard in enumerate(shards):
            self.tier.write_group(gi, layout.buckets[si].shard_offset, shard)

    def _refresh_persistent(self, frozen: bool = True) -> None:
        """Regather the persistent parameters (after their shards changed; frozen ones only change on load)."""
        persistent = [r for r in self.records + (self.frozen_records if frozen else []) if r.persistent]
        for r in persistent:
            self.gatherer.release(r, force=True)
        if persistent:
            self.gatherer.gather(persistent)

    # -- the training step ------------------------------------------------------------------------------
    def forward_context(self) -> contextlib.AbstractContextManager:
        return self.coordinator.forward_pass()

    def before_backward(self, sync: bool) -> None:
        # stage 3 reduces every micro step (whole gradients are never kept), so `sync` changes nothing
        self.coordinator.start_backward()

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        rec = p.ds3
        self.reducer.add(rec, p.grad)
        p.grad = None
        if rec.users <= 0:
            self.gatherer.release(rec)

    def after_backward(self) -> None:
        missing = self.reducer.finish()
        self.coordinator.end_backward()
        if self.frozen_release is not None:
            self.frozen_release.end_backward()
        if missing and not self.ignore_unused:
            raise RuntimeError(
                f"parameters without gradients in this backward: {[r.name for r in missing][:8]}; set "
                "zero_optimization.ignore_unused_parameters=true to treat them as zero")
        # frozen parameters get no gradient (no hook): the ones gathered for this backward go here
        for r in self.records + self.frozen_records:
            if r.users <= 0:
                self.gatherer.release(r)

    def _all_ranks(self, value: torch.Tensor, op: Any) -> torch.Tensor:
        if self.parts > 1:
            comm.all_reduce(value, op=op, group=self.group)
        return value

    def _step_batches(self, grad_dtype: torch.dtype) -> list[list[tuple[int, int]]]:
        """Which optimizer parameters (group, chunk) are stepped together: batches of about _STEP_CHUNK
        elements when the gradients need an fp32 copy; one batch when they are used as they are (fp32,
        on the master's device: `grad_shards` live where the master does) or the optimizer is not
        elementwise (it sees every chunk in the same step)."""
        keys = [(gi, k) for gi, ranges in enumerate(self._ranges) for k in range(len(ranges))]
        if self.nvme_optimizer is not None:
            return []  # the swapper streams its own chunks
        if grad_dtype == torch.float32 or not is_elementwise(self.optimizer):
            return [keys]
        sizes = [hi - lo for gi, k in keys for lo, hi in [self._ranges[gi][k]]]
        return [[keys[i] for i in batch] for batch in batch_by_size(sizes, _STEP_CHUNK)]

    def step(self, loss_scale: float, clip_norm: float, check_overflow: bool) -> StepResult:
        shards = list(self.grad_shards)  # reduced, in the gradient dtype: read in pieces, never cast whole
        pieces = [g[c : c + STEP_CHUNK] for g in shards for c in range(0, g.numel(), STEP_CHUNK)]
        if check_overflow and self._all_ranks(nonfinite_flag(pieces, self.device), comm.ReduceOp.MAX).item() > 0:
            self.reducer.clear()
            return StepResult(overflow=True, grad_norm=None)
        sumsq = sum_of_squares(pieces, self.device)
        norm = float(self._all_ranks(sumsq, comm.ReduceOp.SUM).sqrt().item()) / loss_scale
        inv = 1.0 / grad_divisor(norm, loss_scale, clip_norm)
        if self.nvme_optimizer is not None:  # NVMe: the swapper casts and steps one chunk at a time
            for gi, g in enumerate(shards):
                self._update_nvme_group(gi, g, inv)
        for batch in self._batches:
            self._step_batch(batch, inv)
        self._refresh_persistent(frozen=False)
        self.reducer.clear()
        return StepResult(overflow=False, grad_norm=norm)

    def _step_batch(self, batch: list[tuple[int, int]], inv: float) -> None:
        """Step one batch of master chunks (the other chunks have no grad: torch and ds-kernels skip
        them); model-dtype shards kept apart from the master (another tier) follow chunk by chunk."""
        grads = [self.grad_shards[gi][lo:hi] for gi, k in batch for lo, hi in [self._ranges[gi][k]]]
        # fp32 gradients are scaled in place: the shards are cleared after the step
        step_batch(self.optimizer, [self._opt_params[gi][k] for gi, k in batch], grads, inv)
        for gi, k in batch:
            master = self.master[gi]
            if self.tier.flat(gi) is not master:
                lo, hi = self._ranges[gi][k]
                self.tier.write_group(gi, lo, master[lo:hi])

    def _update_nvme_group(self, gi: int, grad: torch.Tensor, scale: float) -> None:
        from ds_train.offload.nvme_optimizer import adam_hyper

        hyper, adamw = adam_hyper(self.optimizer, gi)
        self.nvme_optimizer.step(gi, grad.to("cpu"), scale, hyper, adamw,
                                 lambda offset, chunk: self.tier.write_group(gi, offset, chunk))

    def zero_grad(self) -> None:
        self.reducer.clear()
        for ps in self.params:
            for p in ps:
                p.grad = None

    # -- parameters ---------------------------------------------------------------------------------------
    def master_shard(self, gi: int) -> torch.Tensor:
        """This rank's fp32 master shard of group `gi` (read from NVMe when it lives there)."""
        if self.nvme_optimizer is not None:
            return self.nvme_optimizer.read_full(gi, "fp32")
        return self.master[gi].detach().float()

    def full_fp32_params(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for gi in range(len(self._layouts)):
            shard = self.master_shard(gi).to(self.device)
            full = self._allgather_shard(shard)
            for rec in (r for r in self.records if r.group == gi):
                rows = full.view(self.parts, -1)[:, rec.shard_offset : rec.shard_offset + rec.shard_numel]
                out[rec.name] = rows.reshape(-1)[: rec.numel].view(rec.shape).cpu().clone()
        return out

    def _allgather_shard(self, shard: torch.Tensor) -> torch.Tensor:
        if self.parts == 1:
            return shard.clone()
        full = torch.empty(shard.numel() * self.parts, dtype=shard.dtype, device=shard.device)
        if self.allgather_partitions:
            comm.all_gather_into_tensor(full, shard.contiguous(), group=self.group)
        else:
            n = shard.numel()
            full[self.rank * n : (self.rank + 1) * n].copy_(shard)
            comm.all_gather_by_broadcast(full, group=self.group)
        return full

    @contextlib.contextmanager
    def gathered_params(self) -> Iterator[None]:
        """Every partitioned parameter whole on every rank; changes made inside are kept (all ranks alike)."""
        from ds_train.zero.init import GatheredParameters

        with GatheredParameters([r.param for r in self.records + self.frozen_records], modifier_rank=None,
                                write_back=True):
            yield

    def write_whole_param(self, rec: Stage3Param) -> None:
        """`rec.full` (whole, gathered) was changed: store this rank's piece as shard and fp32 master."""
        flat = rec.full.reshape(-1)
        piece = torch.zeros(rec.shard_numel, dtype=self.dtype, device=self.device)
        lo = self.rank * rec.shard_numel
        values = flat[lo : min(lo + rec.shard_numel, rec.numel)]
        piece[: values.numel()].copy_(values)
        if rec.group == self.frozen_group:  # no master, no optimizer state: the shard is all there is
            self._write_frozen(rec.shard_offset, piece)
            return
        master = self.master[rec.group]
        if self.nvme_optimizer is not None:
            self.nvme_optimizer.write_range(rec.group, "fp32", rec.shard_offset, piece.float())
        else:  # also when the tier shares the master: a MasterTier stores nothing itself
            master[rec.shard_offset : rec.shard_offset + rec.shard_numel].copy_(piece)
        self.tier.write_group(rec.group, rec.shard_offset, piece)

    def sync_master_from_params(self) -> None:
        """Master weights := the current model-dtype shards (after the module weights were loaded)."""
        for gi in range(len(self._layouts)):
            lowp = self._lowp_shard(gi).float()
            if self.nvme_optimizer is not None:
                self.nvme_optimizer.write_full(gi, "fp32", lowp)
            elif self.master[gi] is not self.tier.flat(gi):
                self.master[gi].copy_(lowp)

    def _lowp_shard(self, gi: int) -> torch.Tensor:
        flat = self.tier.flat(gi)
        if flat is not None:
            return flat
        return self.tier.read_group(gi)

    @property
    def reduce_scatter(self) -> bool:
        """Whether each rank receives only its piece of a reduced bucket (by collective or by sends)."""
        return self.reduce != "all_reduce"

    def describe(self) -> str:
        extra = []
        if self.options.offload_param != "none":
            extra.append(f"params on {self.options.offload_param}")
        if self.options.offload_optimizer != "none":
            extra.append(f"optimizer on {self.options.offload_optimizer}")
        if self.parts > 1:
            extra.append("gradients: " + {"reduce_scatter": "reduce-scatter", "sends": "reduce-scatter by sends",
                                          "all_reduce": "all-reduce"}[self.reduce])
            extra.append("parameters: " + ("all-gather" if self.allgather_partitions else "broadcasts"))
        return "ZeRO stage 3" + (f" ({', '.join(extra)})" if extra else "")

    def destroy(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.swap_folder is not None:
            self.swap_folder.close()


def _chunk_ranges(numel: int) -> list[tuple[int, int]]:
    """Contiguous (lo, hi) ranges covering a shard of `numel` elements (one empty range for an empty shard)."""
    size = chunk_size(numel, _STEP_CHUNK)
    return [(lo, min(numel, lo + size)) for lo in range(0, numel, size)] or [(0, 0)]

