"""ZeRO-3 parameter partitioning: each rank keeps 1/N of every parameter; whole ones exist only while used.

Every partitioned parameter gets a `Stage3Param` record (``param.ds3``). Its *shard* is this rank's
piece of the parameter padded to a multiple of N (the layout of `zero/partition.py` with one bucket
per parameter, so checkpoints and fp32 consolidation share the stage-1/2 code paths). Between uses
``param.data`` is an empty tensor; `ParamGatherer.gather` all-gathers a list of parameters (async when
asked) into a private full buffer per parameter, and `release` drops that buffer: a large parameter
with a collective of its own straight into that buffer, the small ones coalesced into one. The buffers come from a `BufferPool` (exact sizes, reused every step) so the
allocator does not fragment; the gather writes in place (the input is this rank's slice of the output).
Where the backend moves pieces faster that way (gloo: `comm.prefers_point_to_point`; or
`allgather_partitions=false`), each rank's piece is broadcast from it into its slice of the same output
instead of one all-gather: gloo's all-gather copies through whole-size temporaries and took 1.4-2.3x the
time of the broadcasts (tools/bench/bench_gloo_collectives.py). Where a shard lives (device memory, host
memory, an NVMe file) is a `ShardTier`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from ds_core import comm

from ds_train.zero.stage3_buffer_pool import BufferPool

__all__ = ["Stage3Param", "ShardTier", "MemoryTier", "MasterTier", "ParamGatherer", "PendingGather",
           "is_partitioned"]

RELEASED, INFLIGHT, GATHERED = "released", "inflight", "gathered"
_OWN_COLLECTIVE = 1 << 16  # whole elements from which a parameter is gathered by a collective of its own


@dataclass(eq=False)
class Stage3Param:
    """Partition record of one parameter (``param.ds3``)."""

    param: torch.nn.Parameter
    name: str
    shape: tuple[int, ...]
    numel: int
    shard_numel: int  # this rank's piece, after padding the parameter to a multiple of N
    group: int = 0  # optimizer param group
    shard_offset: int = 0  # where the piece starts in the group's flat shard
    persistent: bool = False  # small parameters stay whole on every rank
    status: str = RELEASED
    full: torch.Tensor | None = field(default=None, repr=False)  # padded whole tensor while gathered
    pending: Any = field(default=None, repr=False)  # the PendingGather while in flight
    users: int = 0  # modules that are running with this parameter gathered
    init_shard: torch.Tensor | None = field(default=None, repr=False)  # zero.Init's piece until adopted

    @property
    def available(self) -> bool:
        return self.status == GATHERED


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds3")


class ShardTier(Protocol):
    """Where the model-dtype shards live (offload_param: none / cpu / nvme)."""

    on_disk: bool  # shards live in files (offload_param: nvme), not in memory

    def read(self, rec: Stage3Param) -> torch.Tensor:
        """This rank's shard of `rec` in model dtype on the compute device (may be a temporary)."""

    def write_group(self, group: int, offset: int, values: torch.Tensor) -> None:
        """Store `values` (model dtype) at `offset` of group `group`'s flat shard."""

    def flat(self, group: int) -> torch.Tensor | None:
        """The whole flat shard in memory, or None when it lives on disk."""


class MemoryTier:
    """Shards in one flat tensor per param group, on the device or (offload_param=cpu) in host memory."""

    on_disk = False

    def __init__(self, sizes: list[int], dtype: torch.dtype, device: torch.device, pin: bool = False) -> None:
        self.device = device
        self.flats: list[torch.Tensor] = []
        for n in sizes:
            t = torch.zeros(n, dtype=dtype, device=device)
            if pin:
                from ds_core.accelerator import get_accelerator

                t = get_accelerator().pin_memory(t)
            self.flats.append(t)

    def read(self, rec: Stage3Param) -> torch.Tensor:
        return self.flats[rec.group][rec.shard_offset : rec.shard_offset + rec.shard_numel]

    def write_group(self, group: int, offset: int, values: torch.Tensor) -> None:
        self.flats[group][offset : offset + values.numel()].copy_(values)

    def flat(self, group: int) -> torch.Tensor | None:
        return self.flats[group]


class MasterTier:
    """The model-dtype shards are the fp32 master shards, cast when a gather copies them out.

    Used when the master lives in the same memory as the shards would (no offload, or both offloaded
    to host memory): a second, model-dtype copy would cost 2Ψ/N bytes per rank and a copy after every
    step, and the cast is exactly the rounding that copy did. The master is the only copy, so
    `write_group` stores nothing: whoever changes weights writes the master.
    """

    on_disk = False

    def __init__(self, masters: list[torch.Tensor]) -> None:
        self.flats = masters

    def read(self, rec: Stage3Param) -> torch.Tensor:
        # fp32: the gatherer's copy into its model-dtype input buffer does the cast
        return self.flats[rec.group][rec.shard_offset : rec.shard_offset + rec.shard_numel]

    def write_group(self, group: int, offset: int, values: torch.Tensor) -> None:
        """Nothing to store: the values are derived from the master, which the caller has updated."""

    def flat(self, group: int) -> torch.Tensor | None:
        return self.flats[group]


class PendingGather:
    """An all-gather in flight for a list of parameters; `wait()` installs their whole tensors."""

    def __init__(self, recs: list[Stage3Param], out: torch.Tensor, work: Any, parts: int, pool: BufferPool) -> None:
        self.recs, self.out, self.work, self.parts, self.pool = recs, out, work, parts, pool
        self.buf = out  # the pooled tensor `out` is a slice of
        self.done = False

    def wait(self) -> None:
        if self.done:
            return
        self.done = True
        if self.work is not None:
            self.work.wait()
            self.work = None  # the work object holds the output: let go before it is given back to the pool
        total = self.out.numel() // self.parts
        rows = self.out.view(self.parts, total)
        offset = 0
        for rec in self.recs:
            n = rec.shard_numel
            if len(self.recs) == 1:
                full = self.buf  # one parameter: the (exact-size) gather output is its padded whole tensor
            else:
                full = self.pool.take(self.parts * n, self.out.dtype, self.out.device)
                full.view(self.parts, n).copy_(rows[:, offset : offset + n])
            offset += n
            _install(rec, full)
        buf, self.buf, self.out = self.buf, None, None
        if len(self.recs) != 1:
            del rows
            self.pool.give(buf)


def _install(rec: Stage3Param, full: torch.Tensor) -> None:
    rec.full = full
    rec.param.data = full[: rec.numel].view(rec.shape)
    rec.status = GATHERED
    rec.pending = None


class ParamGatherer:
    """Gathers and releases partitioned parameters on one data-parallel group."""

    def __init__(self, tier: ShardTier, dtype: torch.dtype, device: torch.device, group: Any = None,
                 allgather: bool = True) -> None:
        self.tier, self.dtype, self.device, self.group = tier, dtype, device, group
        self.allgather = allgather  # false: one broadcast per rank of its piece, into the same output
        self.parts = comm.get_world_size(group) if comm.is_initialized() else 1
        self.rank = comm.get_rank(group) if comm.is_initialized() else 0
        self.live_numel = 0  # elements of non-persistent parameters currently whole (or in flight)
        self.by_storage: dict[int, Stage3Param] = {}  # data_ptr of a whole buffer -> record
        self.busy = 0  # > 0 while this class runs tensor ops of its own (the gather-on-use mode skips them)
        # a tier on disk exists to keep the resident set small: free gather buffers are not kept there
        self.pool = BufferPool(enabled=not getattr(tier, "on_disk", False))

    def gather(self, recs: list[Stage3Param], async_op: bool = False) -> PendingGather | None:
        """Start (or finish, when not async) gathering `recs`; already whole/in-flight ones are skipped."""
        self.busy += 1
        try:
            return self._gather(recs, async_op)
        finally:
            self.busy -= 1

    def _gather(self, recs: list[Stage3Param], async_op: bool) -> PendingGather | None:
        todo = [r for r in recs if r.status == RELEASED]
        if not todo:
            if not async_op:
                # also registers ones a sibling's wait already installed (same prefetch batch): unregistered,
                # the saved-tensor hook would not recognise them and autograd would keep them whole
                self._wait(recs)
            return None
        if self.can_read_ahead:  # NVMe: every read of this gather is submitted before the first is waited for
            self.tier.read_ahead(todo)
        # a large parameter gets a collective of its own, straight into its whole buffer; only small ones
        # share one (a batch buffer in rank-major order, then copied out per parameter): the batch buffer and
        # the copies would double the gathered bytes while both exist, and keep a second set of sizes pooled
        small = [r for r in todo if r.shard_numel * self.parts < _OWN_COLLECTIVE]
        groups = [[r] for r in todo if r.shard_numel * self.parts >= _OWN_COLLECTIVE] + ([small] if small else [])
        pending = None
        for group in groups:  # all started before the first is waited for
            pending = self._start(group, async_op or len(groups) > 1)
        if not async_op:
            self.wait(recs)
        return pending

    def _start(self, todo: list[Stage3Param], async_op: bool) -> PendingGather:
        """One collective for `todo` (released parameters); async unless `async_op` is false."""
        total = sum(r.shard_numel for r in todo)
        # one parameter: the output is its whole tensor (exact size, few distinct ones in a model); several:
        # a size class, as prefetch batches vary in size
        buf = self.pool.take(total * self.parts, self.dtype, self.device, round_up=len(todo) > 1)
        out = buf[: total * self.parts]
        # in place: this rank's input is its own slice of the output (no separate input buffer)
        inp = out[self.rank * total : (self.rank + 1) * total]
        offset = 0
        for r in todo:
            inp[offset : offset + r.shard_numel].copy_(self.tier.read(r))
            offset += r.shard_numel
        if self.parts == 1:
            pending = PendingGather(todo, out, None, 1, self.pool)
        elif self.allgather:
            work = comm.all_gather_into_tensor(out, inp, group=self.group, async_op=async_op)
            pending = PendingGather(todo, out, work if async_op else None, self.parts, self.pool)
        else:
            # (the work objects hold views of `out`: only the pending gather may keep them, so that the
            # buffer can go back to the pool once they are waited for)
            work = comm.all_gather_by_broadcast(out, group=self.group, async_op=async_op)
            pending = PendingGather(todo, out, work if async_op else None, self.parts, self.pool)
            del work
        pending.buf = buf
        del inp, out, buf
        for r in todo:
            r.status, r.pending = INFLIGHT, pending
            if not r.persistent:
                self.live_numel += r.shard_numel * self.parts
        return pending

    @property
    def can_read_ahead(self) -> bool:
        """Whether the tier reads shards from a drive and can start reading ahead of use (NVMe)."""
        return hasattr(self.tier, "read_ahead")

    def read_ahead(self, recs: list[Stage3Param]) -> None:
        """Let the tier start reading the shards of `recs` (released ones, in this order of use)."""
        if self.can_read_ahead:
            self.tier.read_ahead([r for r in recs if r.status == RELEASED])

    def wait(self, recs: list[Stage3Param]) -> None:
        self.busy += 1
        try:
            self._wait(recs)
        finally:
            self.busy -= 1

    def _wait(self, recs: list[Stage3Param]) -> None:
        for r in recs:
            if r.status == INFLIGHT:
                r.pending.wait()
                self._register(r)
        for r in recs:
            if r.status == GATHERED and r.full is not None:
                self._register(r)

    def _register(self, rec: Stage3Param) -> None:
        if rec.full is not None:
            self.by_storage[rec.full.untyped_storage().data_ptr()] = rec

    def release(self, rec: Stage3Param, force: bool = False) -> None:
        """Drop the whole tensor of `rec` (persistent ones stay unless `force`)."""
        if rec.persistent and not force:
            return
        self.busy += 1
        try:
            self._release(rec)
        finally:
            self.busy -= 1

    def _release(self, rec: Stage3Param) -> None:
        if rec.status == INFLIGHT:
            rec.pending.wait()
        if rec.status == RELEASED:
            return
        if rec.full is not None:
            self.by_storage.pop(rec.full.untyped_storage().data_ptr(), None)
        if not rec.persistent:
            self.live_numel -= rec.shard_numel * self.parts
        full, rec.full = rec.full, None
        rec.param.data = torch.empty(0, dtype=self.dtype, device=self.device)
        rec.status = RELEASED
        if full is not None:  # after param.data let go of its view; pooled only if nothing else holds one
            self.pool.give(full)

    def lookup(self, tensor: torch.Tensor) -> Stage3Param | None:
        """The partitioned parameter whose whole buffer `tensor` shares storage with, if any."""
        if not self.by_storage:
            return None
        try:
            ptr = tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return self.by_storage.get(ptr)
