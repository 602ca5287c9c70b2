"""ZeRO-3 gradients: reduce-scattered as backward produces them, accumulated only as this rank's shard.

Parameters are grouped into buckets of about `reduce_bucket_size` elements in a fixed order (reverse
registration order, roughly the order backward produces them). A parameter's whole gradient is
copied into its bucket's staging buffer as a (N, shard) block, so one `reduce_scatter_tensor` per
bucket hands each rank exactly its pieces. Where the backend is faster that way (gloo:
`comm.prefers_point_to_point`) the rows are exchanged by point-to-point sends and this rank adds the
copies of its row in place (`comm.reduce_scatter_by_sends`): no output buffer and none of gloo's
whole-size reduce-scatter temporaries (its reduce_scatter_tensor takes 2-3x the time of the sends:
tools/bench/bench_gloo_collectives.py). With `reduce_scatter=false` the staging buffer is all-reduced in
place and this rank keeps its row. Buckets launch strictly in order: every rank issues the
same collectives in the same sequence even when hooks fire in another order or a parameter gets no
gradient on some rank (it counts as zero when `after_backward` forces the rest out).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ds_core import comm

from ds_train.zero.stage3_params import Stage3Param

__all__ = ["GradReducer", "GradShards"]


class GradShards:
    """This rank's flat gradient shard per param group, allocated when first touched, freed by `release`.

    They exist from the first reduce-scatter of a backward until the optimizer step (or zero_grad), not
    through the forward: the forward and the start of backward hold the activations, the step's peak,
    and 2Ψ/N (bf16) of gradients there would add to it for nothing.
    """

    def __init__(self, sizes: list[int], dtype: torch.dtype, device: torch.device) -> None:
        self.sizes, self.dtype, self.device = sizes, dtype, device
        self._shards: list[torch.Tensor | None] = [None] * len(sizes)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, group: int) -> torch.Tensor:
        shard = self._shards[group]
        if shard is None:
            shard = self._shards[group] = torch.zeros(self.sizes[group], dtype=self.dtype, device=self.device)
        return shard

    def __iter__(self):
        return (self[gi] for gi in range(len(self.sizes)))

    def allocated(self) -> list[torch.Tensor]:
        return [t for t in self._shards if t is not None]

    def release(self) -> None:
        self._shards = [None] * len(self.sizes)


class _Bucket:
    def __init__(self, recs: list[Stage3Param]) -> None:
        self.recs = recs
        self.offsets: dict[int, int] = {}
        total = 0
        for r in recs:
            self.offsets[id(r)] = total
            total += r.shard_numel
        self.shard_total = total
        self.staging: torch.Tensor | None = None
        self.remaining = len(recs)


class GradReducer:
    """Fills `grad_shards[group]` (flat, this rank's layout) with the averaged gradients."""

    def __init__(self, recs: list[Stage3Param], grad_shards: GradShards, *, bucket_size: int,
                 comm_dtype: torch.dtype, group: Any, overlap: bool,
                 predivide: float = 1.0, prescale: bool = False, reduce: str = "reduce_scatter") -> None:
        if reduce not in ("reduce_scatter", "sends", "all_reduce"):
            raise ValueError(f"unknown gradient reduction {reduce!r}")
        self.group = group
        self.reduce = reduce  # "sends" / "all_reduce": the staging block is reduced in place, we keep our row
        self.parts = comm.get_world_size(group) if comm.is_initialized() else 1
        self.rank = comm.get_rank(group) if comm.is_initialized() else 0
        self.grad_shards = grad_shards
        self.comm_dtype = comm_dtype
        self.overlap = overlap
        self.predivide, self.prescale = predivide, prescale
        self.buckets: list[_Bucket] = []
        current: list[Stage3Param] = []
        size = 0
        for r in reversed(recs):
            current.append(r)
            size += r.shard_numel * self.parts
            if size >= bucket_size:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.bucket_of = {id(r): b for b in self.buckets for r in b.recs}
        self.first_micro = True
        self.reset()

    @property
    def reduce_scatter(self) -> bool:
        return self.reduce != "all_reduce"

    def reset(self) -> None:
        self.next = 0
        self.pending: list[tuple[Any, Callable[[], None], torch.Tensor]] = []
        self.seen: set[int] = set()
        for b in self.buckets:
            b.staging, b.remaining = None, len(b.recs)

    def add(self, rec: Stage3Param, grad: torch.Tensor) -> None:
        """A whole gradient arrived for `rec`: stage it and launch every bucket that is complete, in order."""
        bucket = self.bucket_of[id(rec)]
        if bucket.staging is None:
            bucket.staging = torch.zeros(self.parts, bucket.shard_total, dtype=self.comm_dtype, device=grad.device)
        n, o = rec.shard_numel, bucket.offsets[id(rec)]
        flat = grad.reshape(-1)
        block = bucket.staging[:, o : o + n]
        if flat.numel() == n * self.parts:
            block.copy_(flat.view(self.parts, n))
        else:  # the last rank's piece is padding: copy the full rows, then the tail
            full_rows, tail = divmod(flat.numel(), n)
            if full_rows:
                block[:full_rows].copy_(flat[: full_rows * n].view(full_rows, n))
            if tail:
                block[full_rows, :tail].copy_(flat[full_rows * n :])
        if id(rec) not in self.seen:
            self.seen.add(id(rec))
            bucket.remaining -= 1
        self._launch_ready(force=False)

    def _launch_ready(self, force: bool) -> None:
        while self.next < len(self.buckets):
            b = self.buckets[self.next]
            if b.remaining > 0 and not force:
                return
            self._launch(b)
            self.next += 1

    def _launch(self, b: _Bucket) -> None:
        if b.staging is None:
            b.staging = torch.zeros(self.parts, b.shard_total, dtype=self.comm_dtype,
                                    device=self.grad_shards.device)
        if self.prescale:
            pre, post = 1.0 / self.predivide, self.predivide / self.parts
        else:
            pre, post = 1.0, 1.0 / self.parts
        if pre != 1.0:
            b.staging.mul_(pre)
        if self.parts == 1:
            out, work = b.staging.view(-1), None
        elif self.reduce == "all_reduce":
            out = b.staging[self.rank]  # this rank's row, valid once the all-reduce is done
            work = comm.all_reduce(b.staging, group=self.group, async_op=self.overlap)
        elif self.reduce == "sends":
            out = b.staging[self.rank]  # this rank's row, summed in place once the exchange is done
            work = comm.reduce_scatter_by_sends(b.staging.view(-1), group=self.group, async_op=self.overlap)
        else:
            out = torch.empty(b.shard_total, dtype=self.comm_dtype, device=b.staging.device)
            work = comm.reduce_scatter_tensor(out, b.staging.view(-1), group=self.group, async_op=self.overlap)
        staging, b.staging = b.staging, None  # kept with the pending work: the collective may still read it
        first = self.first_micro

        def finish() -> None:
            if post != 1.0:
                out.mul_(post)
            for r in b.recs:
                o = b.offsets[id(r)]
                target = self.grad_shards[r.group][r.shard_offset : r.shard_offset + r.shard_numel]
                if first:
                    target.copy_(out[o : o + r.shard_numel])
                else:
                    target.add_(out[o : o + r.shard_numel])

        if self.overlap and work is not None:
            self.pending.append((work, finish, staging))
            # at most two buckets in flight: their staging buffers are the memory of this overlap
            while len(self.pending) > 2:
                old_work, old_finish, _ = self.pending.pop(0)
                old_work.wait()
                old_finish()
        else:
            finish()

    def finish(self) -> list[Stage3Param]:
        """Force out the remaining buckets, wait for all; return the params that got no gradient."""
        missing = [r for b in self.buckets for r in b.recs if id(r) not in self.seen]
        self._launch_ready(force=True)
        for work, done, _ in self.pending:
            work.wait()
            done()
        self.reset()
        self.first_micro = False
        return missing

    def clear(self) -> None:
        self.grad_shards.release()  # the next backward starts from zero (its first micro step copies)
        self.first_micro = True
