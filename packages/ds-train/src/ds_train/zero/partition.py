"""Flat buffers and shard maps for ZeRO stages 1-2 (and stage 0 with one part).

The trainable parameters of one optimizer param group are laid out back to back in one flat buffer,
cut into *buckets* at parameter boundaries (about ``bucket_size`` elements each). Each bucket is
padded to a multiple of ``parts`` (the data-parallel size) and split into ``parts`` equal pieces;
rank r owns piece r of every bucket. Why buckets own the partition: a bucket fills during backward
as its parameters' gradients arrive, and it can then be reduce-scattered on its own (each rank gets
exactly its piece) while backward goes on; after the step the same pieces are all-gathered back.

A rank's *shard* is its pieces of all buckets, concatenated; the fp32 master weights and the
optimizer state live in shard-shaped tensors. `pieces()` maps shard ranges to parameter ranges,
which is all checkpoint resharding and fp32 consolidation need.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ParamSlot", "Bucket", "GroupLayout", "Piece", "build_layout"]


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives in its group's flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # first element in the flat buffer
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Bucket:
    """A range of the flat buffer, whole parameters plus padding, split into `parts` equal pieces."""

    start: int
    end: int  # padded end; (end - start) % parts == 0
    first_param: int  # index into GroupLayout.slots
    last_param: int  # exclusive
    shard_offset: int  # where this bucket's piece starts in every rank's shard

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Piece:
    """A run of elements that is contiguous both in a shard and in one parameter."""

    param: int  # index into slots
    param_offset: int  # element offset inside the parameter (flattened)
    shard_offset: int  # element offset inside the rank's shard
    length: int


@dataclass
class GroupLayout:
    """The flat layout of one param group for `parts` ranks."""

    slots: list[ParamSlot]
    buckets: list[Bucket]
    parts: int
    numel: int  # padded size of the flat buffer
    _pieces: dict[int, list[Piece]] = field(default_factory=dict, repr=False)

    def piece_size(self, bucket: Bucket) -> int:
        return bucket.numel // self.parts

    @property
    def shard_numel(self) -> int:
        return self.numel // self.parts

    def piece_range(self, bucket: Bucket, rank: int) -> tuple[int, int]:
        """The flat-buffer range of `rank`'s piece of `bucket`."""
        size = self.piece_size(bucket)
        lo = bucket.start + rank * size
        return lo, lo + size

    def shard_views(self, flat: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """Views of `flat` (the full buffer) for `rank`'s pieces, in shard order."""
        return [flat[slice(*self.piece_range(b, rank))] for b in self.buckets]

    def param_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One view of `flat` per parameter, shaped like the parameter."""
        return [flat[s.offset : s.end].view(s.shape) for s in self.slots]

    def pieces(self, rank: int) -> list[Piece]:
        """Every (parameter range <-> shard range) correspondence of `rank`'s shard; padding is skipped."""
        if rank in self._pieces:
            return self._pieces[rank]
        out: list[Piece] = []
        for b in self.buckets:
            lo, hi = self.piece_range(b, rank)
            shard_base = b.shard_offset - lo  # shard offset = flat offset + shard_base
            for i in range(b.first_param, b.last_param):
                s = self.slots[i]
                a, z = max(lo, s.offset), min(hi, s.end)
                if a < z:
                    out.append(Piece(i, a - s.offset, a + shard_base, z - a))
        self._pieces[rank] = out
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "numel": self.numel,
            "params": [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self.slots],
            "buckets": [[b.start, b.end, b.first_param, b.last_param, b.shard_offset] for b in self.buckets],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupLayout:
        slots = []
        for p in data["params"]:
            shape = tuple(int(d) for d in p["shape"])
            numel = 1
            for d in shape:
                numel *= d
            slots.append(ParamSlot(p["name"], shape, int(p["offset"]), numel))
        buckets = [Bucket(*[int(v) for v in b]) for b in data["buckets"]]
        return cls(slots=slots, buckets=buckets, parts=int(data["parts"]), numel=int(data["numel"]))


def build_layout(names: list[str], shapes: list[tuple[int, ...]], parts: int, bucket_size: int) -> GroupLayout:
    """Lay out parameters (in order) into buckets of about `bucket_size` elements for `parts` ranks.

    A bucket closes once it holds at least `bucket_size` elements, so a parameter larger than the
    bucket size gets a bucket of its own; every bucket is padded up to a multiple of `parts`.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    slots: list[ParamSlot] = []
    buckets: list[Bucket] = []
    offset = 0
    bucket_start, bucket_first, shard_offset = 0, 0, 0

    def close(last: int) -> None:
        nonlocal offset, bucket_start, bucket_first, shard_offset
        used = offset - bucket_start
        padded = -(-used // parts) * parts
        offset = bucket_start + padded
        buckets.append(Bucket(bucket_start, offset, bucket_first, last, shard_offset))
        shard_offset += padded // parts
        bucket_start, bucket_first = offset, last

    for i, (name, shape) in enumerate(zip(names, shapes)):
        numel = 1
        for d in shape:
            numel *= int(d)
        slots.append(ParamSlot(name, tuple(int(d) for d in shape), offset, numel))
        offset += numel
        if offset - bucket_start >= bucket_size:
            close(i + 1)
    if bucket_first < len(slots) or not buckets:
        close(len(slots))
    return GroupLayout(slots=slots, buckets=buckets, parts=parts, numel=offset)
