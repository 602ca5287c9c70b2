"""ZeRO stages 0, 1 and 2 over bucketed flat buffers (see `zero/partition.py` for the layout).

- Stage 0: every rank holds everything; gradients are all-reduced bucket by bucket as backward fills
  them (only on the micro step that synchronizes).
- Stage 1: fp32 master weights and optimizer state are sharded; full gradients are accumulated
  locally and reduce-scattered bucket by bucket on the synchronizing micro step.
- Stage 2: gradients are sharded too: every micro step reduce-scatters each bucket as soon as it is
  full and accumulates only this rank's piece.
After the update (stages 1, 2) each bucket's updated pieces are all-gathered into the low-precision
flat buffer the model's parameters are views of.

Buckets are launched in a fixed order (last bucket first, as backward produces them) so that every
rank issues the same collectives in the same order, whatever order the hooks fire in.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ds_core import comm
from ds_core.accelerator import get_accelerator

from ds_train.optim import Lamb, is_elementwise, materialize_state
from ds_train.zero.chunked_step import (
    STEP_CHUNK,
    batch_by_size,
    chunk_size,
    nonfinite_flag,
    step_batch,
    sum_of_squares,
    usable_as_is,
)
from ds_train.zero.chunked_step import is_state_tensor as _is_state_tensor
from ds_train.zero.grad_staging import StagingBuffers
from ds_train.zero.partition import Bucket, GroupLayout, build_layout
from ds_train.zero.stage1_2_checkpoint import Stage012CheckpointMixin
from ds_train.zero.stage1_2_full_state import attach as _attach_full_state
from ds_train.zero.strategy import StepResult, ZeroStrategy, grad_divisor, pick_collectives

__all__ = ["ZeroStage012"]


_MAX_INFLIGHT = 2  # stage-1/2 bucket reductions in flight at once (each holds staging or receive buffers)
_STEP_CHUNK = STEP_CHUNK  # elements per optimizer call (see zero/chunked_step.py); tests shrink it here


class _Pending:
    """An in-flight reduction and what to do once it lands."""

    __slots__ = ("work", "finish")

    def __init__(self, work: Any, finish: Callable[[], None]) -> None:
        self.work, self.finish = work, finish

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        self.finish()


class ZeroStage012(Stage012CheckpointMixin, ZeroStrategy):
    """Stages 0-2 on one data-parallel group. `make_optimizer(groups)` builds the torch optimizer."""

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        param_names: dict[int, str],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        *,
        stage: int,
        dtype: torch.dtype,
        grad_dtype: torch.dtype,
        comm_dtype: torch.dtype | None,
        device: torch.device,
        group: Any = None,
        bucket_size: int = 500_000_000,
        allgather_bucket_size: int = 500_000_000,
        overlap_comm: bool = True,
        reduce_scatter: bool | None = None,
        allgather_partitions: bool | None = None,
        offload_optimizer: bool = False,
        pin_memory: bool = False,
        elementwise: bool = True,
        predivide_factor: float = 1.0,
        prescale_gradients: bool = False,
        ignore_unused_parameters: bool = True,
    ) -> None:
        if stage not in (0, 1, 2):
            raise ValueError(f"ZeroStage012 handles stages 0, 1, 2, not {stage}")
        self.stage = stage
        self.group = group
        self.world = comm.get_world_size(group) if comm.is_initialized() else 1
        self.rank = comm.get_rank(group) if comm.is_initialized() else 0
        self.parts = self.world if stage >= 1 else 1
        self.part = self.rank if stage >= 1 else 0
        self.dtype, self.grad_dtype, self.comm_dtype = dtype, grad_dtype, comm_dtype
        self.device = device
        self.overlap_comm = overlap_comm
        self.reduce, self.allgather_partitions = pick_collectives(group, reduce_scatter, allgather_partitions)
        if stage == 0:
            self.reduce = "all_reduce"  # every rank needs the whole reduced gradient
        self.allgather_bucket_size = allgather_bucket_size
        self.offload = offload_optimizer
        self.pin_memory = pin_memory
        self.predivide = predivide_factor
        self.prescale = prescale_gradients
        self.ignore_unused = ignore_unused_parameters
        self.per_param_master = not elementwise and self.parts == 1

        self.params: list[list[torch.nn.Parameter]] = [list(g["params"]) for g in param_groups]
        self._layouts: list[GroupLayout] = []
        self.flat: list[torch.Tensor] = []  # model-dtype flat buffers; params are views
        for params in self.params:
            names = [param_names[id(p)] for p in params]
            layout = build_layout(names, [tuple(p.shape) for p in params], self.parts, bucket_size)
            flat = torch.zeros(layout.numel, dtype=dtype, device=device)
            for p, view in zip(params, layout.param_views(flat)):
                view.copy_(p.detach())
                p.data = view
            self._layouts.append(layout)
            self.flat.append(flat)
        self._broadcast_flat()

        self.master: list[torch.Tensor] = [self._make_master(i) for i in range(len(self.params))]
        # the optimizer's parameters are views of the master shard: one per model parameter for
        # non-elementwise optimizers, else chunks of one bucket's piece (see _step_ranges); where the
        # master is the model's own fp32 buffer they are views of this rank's pieces of it
        self._ranges: list[list[tuple[int, int, int]]] = [self._step_ranges(i) for i in range(len(self.params))]
        self._opt_params: list[list[torch.Tensor]] = []
        groups = []
        for i, g in enumerate(param_groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            if self.per_param_master:
                opt_params = self._layouts[i].param_views(self.master[i])
            elif self.master[i] is self.flat[i]:
                opt_params = [self.flat[i][f : f + hi - lo]
                              for (lo, hi, _), f in zip(self._ranges[i], self._flat_starts(i), strict=True)]
            else:
                opt_params = [self.master[i][lo:hi] for lo, hi, _ in self._ranges[i]]
            self._opt_params.append(opt_params)
            groups.append({**hyper, "params": opt_params})
        self.optimizer = make_optimizer(groups)
        # the states exist before the first forward, as in DeepSpeed: below the activations in the heap
        # (not in the holes the first backward leaves) and an out-of-memory shows at initialize
        materialize_state(self.optimizer)
        if isinstance(self.optimizer, Lamb) and not self.per_param_master:
            self._shard_lamb()

        # gradient buffers: stages 0/1 keep whole gradients, stage 2 only this rank's shard
        self.grad_full: list[torch.Tensor | None] = []
        self.grad_shard: list[torch.Tensor | None] = []
        for layout in self._layouts:
            if stage <= 1:
                self.grad_full.append(torch.zeros(layout.numel, dtype=grad_dtype, device=device))
                self.grad_shard.append(None)
            else:
                self.grad_full.append(None)
                self.grad_shard.append(torch.zeros(layout.shard_numel, dtype=grad_dtype, device=device))

        self._batches = self._step_batches()  # after the gradient buffers: it looks at their dtype
        # stages 0/1 with model-dtype gradients: each p.grad is its view of the gradient buffer, so autograd
        # accumulates in place (no per-parameter gradient allocated, copied and freed in every backward)
        self._grad_views: dict[int, torch.Tensor] = {}
        if stage <= 1 and grad_dtype == dtype:
            for params, layout, buf in zip(self.params, self._layouts, self.grad_full, strict=True):
                for p, view in zip(params, layout.param_views(buf), strict=True):
                    self._grad_views[id(p)] = view
                    p.grad = view

        self._bucket_of: dict[int, tuple[int, int, int]] = {}  # id(param) -> (group, slot, bucket)
        for gi, layout in enumerate(self._layouts):
            for bi, b in enumerate(layout.buckets):
                for si in range(b.first_param, b.last_param):
                    self._bucket_of[id(self.params[gi][si])] = (gi, si, bi)
        self._order = [(gi, bi) for gi in reversed(range(len(self._layouts)))
                       for bi in reversed(range(len(self._layouts[gi].buckets)))]
        self._sync = False
        self._staging = StagingBuffers(self._layouts, grad_dtype, device)  # stage 2 only
        self._first_micro = True  # stage 2: the first micro step writes its piece instead of adding
        self._reset_backward_state()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for ps in self.params for p in ps]
        _attach_full_state(self)  # safe_get/set_full_* find this strategy from its parameters

    def describe(self) -> str:
        if self.parts == 1 or self.world == 1:
            return super().describe()
        reduce = {"reduce_scatter": "reduce-scatter", "sends": "reduce-scatter by sends",
                  "all_reduce": "all-reduce"}[self.reduce]
        gather = "all-gather" if self.allgather_partitions else "broadcasts"
        return f"{super().describe()} (gradients: {reduce}, parameters: {gather})"

    @property
    def reduce_scatter(self) -> bool:
        """Whether each rank receives only its piece of a reduced bucket (by collective or by sends)."""
        return self.reduce != "all_reduce"

    # -- setup helpers -------------------------------------------------------------------------------
    def _broadcast_flat(self) -> None:
        """Rank 0's initial weights everywhere (as DeepSpeed does at initialize)."""
        if self.world > 1:
            src = comm.get_global_rank(self.group, 0) if self.group is not None else 0
            for flat in self.flat:
                comm.broadcast(flat, src, group=self.group)

    def _make_master(self, gi: int) -> torch.Tensor:
        layout, flat = self._layouts[gi], self.flat[gi]
        if self.dtype == torch.float32 and not self.offload:
            # fp32: the model's buffer is the master copy; at stages 1/2 this rank's pieces of it are its
            # shard, updated in place by the optimizer and then broadcast (no 4 bytes/param/N copy)
            return flat
        device = torch.device("cpu") if self.offload else self.device
        # offload: a separate host buffer even on a CPU-only machine, so the mechanism is the real one
        master = torch.empty(layout.shard_numel, dtype=torch.float32, device=device)
        if self.offload and self.pin_memory:
            master = get_accelerator().pin_memory(master)
        self._gather_pieces(layout, flat, self.part, out=master)
        return master

    def _step_ranges(self, gi: int) -> list[tuple[int, int, int]]:
        """(shard_lo, shard_hi, grad_lo) of each optimizer parameter of group `gi`: its master-shard
        range and where its gradient starts in the gradient buffer (the shard for stage 2, the whole
        flat buffer otherwise). Chunks stay inside one bucket's piece so each reads one contiguous run."""
        layout = self._layouts[gi]
        if self.per_param_master:  # parts == 1: the shard is the flat buffer
            return [(s.offset, s.end, s.offset) for s in layout.slots]
        chunk = chunk_size(layout.shard_numel, _STEP_CHUNK)
        out = []
        for b in layout.buckets:
            n = layout.piece_size(b)
            flat_lo = layout.piece_range(b, self.part)[0]
            for c in range(0, n, chunk):
                lo, hi = b.shard_offset + c, b.shard_offset + min(n, c + chunk)
                out.append((lo, hi, lo if self.stage == 2 else flat_lo + c))
        return out

    def _flat_starts(self, gi: int) -> list[int]:
        """Where each optimizer parameter of group `gi` (a chunk inside one bucket's piece) starts in the
        flat buffer (with one part, shard and flat coordinates coincide)."""
        layout = self._layouts[gi]
        pieces = [(b.shard_offset, b.shard_offset + layout.piece_size(b), layout.piece_range(b, self.part)[0])
                  for b in layout.buckets]
        out = []
        for lo, _, _ in self._ranges[gi]:
            out.append(next(flat_lo + lo - s_lo for s_lo, s_hi, flat_lo in pieces if s_lo <= lo < s_hi))
        return out

    def _master_shard(self, gi: int) -> torch.Tensor:
        """This rank's fp32 master shard as one tensor: a copy of its pieces when they live in the model's
        buffer (stages 1/2 in fp32), else the master itself."""
        master, flat = self.master[gi], self.flat[gi]
        if master is not flat or self.parts == 1:
            return master
        layout = self._layouts[gi]
        return self._gather_pieces(layout, flat, self.part,
                                   out=torch.empty(layout.shard_numel, dtype=torch.float32, device=flat.device))

    def _write_master_shard(self, gi: int, shard: torch.Tensor) -> None:
        master, flat = self.master[gi], self.flat[gi]
        if master is not flat or self.parts == 1:
            master.copy_(shard)
            return
        layout = self._layouts[gi]
        for b, view in zip(layout.buckets, layout.shard_views(flat, self.part), strict=True):
            view.copy_(shard[b.shard_offset : b.shard_offset + view.numel()])

    def _step_batches(self) -> list[list[tuple[int, int]]]:
        """Which optimizer parameters (group, index) are stepped together. Optimizers whose state is
        per parameter step in batches of about _STEP_CHUNK elements, so the fp32 copies of low-precision
        gradients exist for one batch at a time (not a whole shard); any other optimizer gets one batch."""
        keys = [(gi, k) for gi, ranges in enumerate(self._ranges) for k in range(len(ranges))]
        # a sharded Lamb needs every piece of a tensor in the same step (its norms span pieces and ranks)
        if not (is_elementwise(self.optimizer) or (isinstance(self.optimizer, Lamb) and self.per_param_master)):
            return [keys]
        if all(self._usable_as_is(gi, k, self._opt_params[gi][k]) for gi, k in keys):
            return [keys]  # fp32 gradients next to the master: nothing is copied, one call steps them all
        sizes = [self._ranges[gi][k][1] - self._ranges[gi][k][0] for gi, k in keys]
        return [[keys[i] for i in batch] for batch in batch_by_size(sizes, _STEP_CHUNK)]

    def _shard_lamb(self) -> None:
        """Tell Lamb which runs of each optimizer parameter (a chunk of this rank's shard) belong to
        which model tensor, so it can sum per-tensor norms over pieces and ranks (see optim/lamb.py)."""
        segments: dict[int, list[tuple[int, int, int]]] = {}
        first = 0  # index of the group's first tensor among all groups' tensors
        for gi, layout in enumerate(self._layouts):
            runs = layout.pieces(self.part)
            for p, (lo, hi, _) in zip(self._opt_params[gi], self._ranges[gi]):
                segments[id(p)] = [(first + r.param, a - lo, z - lo) for r in runs
                                   for a, z in [(max(lo, r.shard_offset), min(hi, r.shard_offset + r.length))]
                                   if a < z]
            first += len(layout.slots)
        self.optimizer.shard(segments, first, lambda t: self._all_ranks(t, comm.ReduceOp.SUM))

    @staticmethod
    def _gather_pieces(layout: GroupLayout, flat: torch.Tensor, part: int, out: torch.Tensor) -> torch.Tensor:
        for b, view in zip(layout.buckets, layout.shard_views(flat, part)):
            n = view.numel()
            out[b.shard_offset : b.shard_offset + n].copy_(view)
        return out

    # -- backward -----------------------------------------------------------------------------------
    def _reset_backward_state(self) -> None:
        self._remaining = [[b.last_param - b.first_param for b in layout.buckets] for layout in self._layouts]
        self._ready: set[tuple[int, int]] = set()
        self._next = 0  # index into self._order of the next bucket to launch
        self._staging.clear_live()
        self._pending: list[_Pending] = []
        self._seen: set[int] = set()

    def before_backward(self, sync: bool) -> None:
        # stage 2 reduces on every micro step (its gradients are sharded); `sync` matters for 0 and 1
        self._sync = sync
        self._reset_backward_state()

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        gi, si, bi = self._bucket_of[id(p)]
        slot = self._layouts[gi].slots[si]
        grad = p.grad
        view = self._grad_views.get(id(p))
        if view is not None:
            if grad is not view:  # p.grad was replaced or set to None by the user: fold it in, re-point
                view.add_(grad)
                p.grad = view
        elif self.stage <= 1:
            self.grad_full[gi][slot.offset : slot.end].view(slot.shape).add_(grad)
        else:
            self._staging.get(gi, bi)[slot.offset - self._layouts[gi].buckets[bi].start :][: slot.numel].copy_(
                grad.reshape(-1)
            )
        if view is None:
            p.grad = None
        if id(p) in self._seen:
            return
        self._seen.add(id(p))
        self._remaining[gi][bi] -= 1
        if self._remaining[gi][bi] == 0:
            self._ready.add((gi, bi))
            self._launch_ready()

    def _launch_ready(self, force: bool = False) -> None:
        if not self._sync and self.stage <= 1:
            return
        while self._next < len(self._order):
            key = self._order[self._next]
            if not force and key not in self._ready:
                return
            self._launch(*key)
            self._next += 1

    def after_backward(self) -> None:
        if self._sync or self.stage == 2:
            unused = [layout.slots[si].name for gi, layout in enumerate(self._layouts)
                      for si, p in enumerate(self.params[gi]) if id(p) not in self._seen]
            if unused and not self.ignore_unused:
                raise RuntimeError(
                    f"parameters without gradients in this backward: {unused[:8]}; set "
                    "zero_optimization.ignore_unused_parameters=true to treat them as zero"
                )
            self._launch_ready(force=True)
            for pending in self._pending:
                pending.wait()
            self._pending = []
            self._staging.release_all()
            if self.stage == 2:
                self._first_micro = False

    def _pre_post_factors(self) -> tuple[float, float]:
        if self.prescale:
            pre = 1.0 / self.predivide
            post = self.predivide / self.world
        else:
            pre = 1.0
            post = 1.0 / self.world
        return pre, post

    def _launch(self, gi: int, bi: int) -> None:
        """Start reducing bucket `bi` of group `gi` (async when overlap_comm)."""
        layout = self._layouts[gi]
        b = layout.buckets[bi]
        pre, post = self._pre_post_factors()
        if self.stage <= 1:
            src = self.grad_full[gi][b.start : b.end]
        else:
            src = self._staging.zero_unwritten(gi, bi, [si for si in range(b.first_param, b.last_param)
                                                        if id(self.params[gi][si]) not in self._seen])
        if self.world == 1:
            if self.stage == 2:
                self._accumulate_piece(gi, b, src)
                self._staging.release(gi, bi)
            return
        send = src if self.comm_dtype in (None, src.dtype) else src.to(self.comm_dtype)
        if pre != 1.0:
            send.mul_(pre)
        lo, hi = layout.piece_range(b, self.part)
        received = None
        if self.reduce != "reduce_scatter":
            if self.reduce == "all_reduce":
                work = comm.all_reduce(send, group=self.group, async_op=self.overlap_comm)
            else:
                if send.dtype == self.grad_dtype:
                    received = self._staging.take(send.numel() - (hi - lo))
                work = comm.reduce_scatter_by_sends(send, group=self.group, async_op=self.overlap_comm,
                                                    received=received)

            def finish() -> None:
                # sends reduce only this rank's piece, and stage 2 keeps only that piece of an all-reduce:
                # scale (and cast) just that; stages 0/1 all-reduced keep the whole average in p.grad
                keep = slice(lo - b.start, hi - b.start) if self.stage == 2 or self.reduce == "sends" else slice(None)
                if send is not src:
                    src[keep].copy_(send[keep])
                src[keep].mul_(post)
                if self.stage == 2:
                    self._accumulate_piece(gi, b, src[keep])
        else:
            out = torch.empty(hi - lo, dtype=send.dtype, device=send.device)
            work = comm.reduce_scatter_tensor(out, send, group=self.group, async_op=self.overlap_comm)

            def finish() -> None:
                out.mul_(post)
                if self.stage == 1:
                    self.grad_full[gi][lo:hi].copy_(out)
                else:
                    self._accumulate_piece(gi, b, out)

        def finish_and_release() -> None:
            finish()
            if received is not None:
                self._staging.put(received)
            if self.stage == 2:
                self._staging.release(gi, bi)

        pending = _Pending(work if self.overlap_comm else None, finish_and_release)
        if self.overlap_comm:
            self._pending.append(pending)
            # bound the staging and receive memory (DeepSpeed's double-buffered buckets): wait for the oldest
            while self.stage >= 1 and len(self._pending) > _MAX_INFLIGHT:
                self._pending.pop(0).wait()
        else:
            pending.wait()

    def _accumulate_piece(self, gi: int, b: Bucket, piece: torch.Tensor) -> None:
        """Stage 2: add this rank's reduced piece (or the whole bucket when world == 1) to its shard."""
        if piece.numel() == b.numel and self.parts > 1:
            lo, hi = self._layouts[gi].piece_range(b, self.part)
            piece = piece[lo - b.start : hi - b.start]
        target = self.grad_shard[gi][b.shard_offset : b.shard_offset + piece.numel()]
        if self._first_micro:
            target.copy_(piece)
        else:
            target.add_(piece)

    # -- step ---------------------------------------------------------------------------------------
    def _grad_source(self, gi: int, k: int) -> torch.Tensor:
        """The accumulated (reduced) gradient of optimizer parameter k of group gi, in grad_dtype."""
        lo, hi, glo = self._ranges[gi][k]
        buf = self.grad_shard[gi] if self.stage == 2 else self.grad_full[gi]
        return buf[glo : glo + hi - lo]

    def _all_ranks(self, value: torch.Tensor, op: Any) -> torch.Tensor:
        if self.parts > 1:
            comm.all_reduce(value, op=op, group=self.group)
        return value

    def step(self, loss_scale: float, clip_norm: float, check_overflow: bool) -> StepResult:
        keys = [key for batch in self._batches for key in batch]
        pieces = [self._grad_source(*key) for key in keys]  # views: read piece by piece, never cast whole
        if check_overflow and self._all_ranks(nonfinite_flag(pieces, self.device), comm.ReduceOp.MAX).item() > 0:
            self._clear_grads()
            return StepResult(overflow=True, grad_norm=None)
        sumsq = sum_of_squares(pieces, self.device)
        norm = float(self._all_ranks(sumsq, comm.ReduceOp.SUM).sqrt().item()) / loss_scale
        inv = 1.0 / grad_divisor(norm, loss_scale, clip_norm)
        for batch in self._batches:
            self._step_batch(batch, inv)
        self._refresh_params()
        self._clear_grads()
        return StepResult(overflow=False, grad_norm=norm)

    def _step_batch(self, batch: list[tuple[int, int]], inv: float) -> None:
        """Give the batch's optimizer parameters their fp32 gradients (views of the gradient buffer when
        that is already fp32 on the master's device, else copies into one batch-sized buffer), step."""
        # the gradient buffers are zeroed after the step, so scaling fp32 ones in place is safe
        step_batch(self.optimizer, [self._opt_params[gi][k] for gi, k in batch],
                   [self._grad_source(gi, k) for gi, k in batch], inv)

    def _usable_as_is(self, gi: int, k: int, p: torch.Tensor) -> bool:
        return usable_as_is(self.grad_shard[gi] if self.stage == 2 else self.grad_full[gi], p)

    def _clear_grads(self) -> None:
        for buf in self.grad_full + self.grad_shard:
            if buf is not None:
                buf.zero_()
        self._first_micro = True

    def zero_grad(self) -> None:
        self._clear_grads()
        for ps in self.params:
            for p in ps:
                p.grad = self._grad_views.get(id(p))

    def _refresh_params(self) -> None:
        """Copy the updated master shard into the model-dtype buffer and all-gather the pieces."""
        for gi, layout in enumerate(self._layouts):
            flat, master = self.flat[gi], self.master[gi]
            if master is not flat:  # else the optimizer updated this rank's pieces of `flat` in place
                for b, view in zip(layout.buckets, layout.shard_views(flat, self.part)):
                    view.copy_(master[b.shard_offset : b.shard_offset + view.numel()])
            if self.parts > 1:
                self._allgather(layout, flat)

    def _allgather(self, layout: GroupLayout, flat: torch.Tensor) -> None:
        works = []
        for b in layout.buckets:
            size = layout.piece_size(b)
            if not self.allgather_partitions:
                works.append(comm.all_gather_by_broadcast(flat[b.start : b.end], group=self.group, async_op=True))
                continue
            # at most allgather_bucket_size elements per call: split the pieces into chunks
            step = max(1, self.allgather_bucket_size // self.parts)
            for c in range(0, size, step):
                n = min(step, size - c)
                if n == size:
                    out = flat[b.start : b.end]
                    works.append(comm.all_gather_into_tensor(out, out[self.part * size : (self.part + 1) * size],
                                                             group=self.group, async_op=True))
                else:
                    outs = [flat[b.start + r * size + c : b.start + r * size + c + n] for r in range(self.parts)]
                    works.append(comm.all_gather(outs, outs[self.part].clone(), group=self.group, async_op=True))
        for w in works:
            if w is not None:
                w.wait()

    # -- parameters ---------------------------------------------------------------------------------
    def full_fp32_params(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for gi, layout in enumerate(self._layouts):
            full = torch.zeros(layout.numel, dtype=torch.float32, device=self.device)
            master = self._master_shard(gi).detach().float().to(self.device)
            for b in layout.buckets:
                lo, hi = layout.piece_range(b, self.part)
                full[lo:hi] = master[b.shard_offset : b.shard_offset + hi - lo]
            if self.parts > 1:
                for b in layout.buckets:
                    chunk = full[b.start : b.end]
                    size = layout.piece_size(b)
                    comm.all_gather_into_tensor(chunk, chunk[self.part * size : (self.part + 1) * size].clone(),
                                                group=self.group)
            for slot, view in zip(layout.slots, layout.param_views(full)):
                out[slot.name] = view.cpu().clone()
        return out

    def model_state_tensors(self) -> dict[str, list[torch.Tensor]]:
        opt_state = [t for ps in self._opt_params for p in ps for k, t in self.optimizer.state.get(p, {}).items()
                     if _is_state_tensor(k, t, p)]
        return {
            "params": list(self.flat),
            "grads": [g for g in self.grad_full + self.grad_shard if g is not None],
            "master": [m for m, f in zip(self.master, self.flat) if m is not f],
            "optimizer": opt_state,
        }

    def sync_master_from_params(self) -> None:
        for gi, layout in enumerate(self._layouts):
            if self.master[gi] is not self.flat[gi]:
                self._gather_pieces(layout, self.flat[gi], self.part, out=self.master[gi])
