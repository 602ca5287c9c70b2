"""The engine's data loader: a rank's share of the dataset, shuffled per epoch, resumable mid-epoch.

DeepSpeed's loader is a DataLoader over a DistributedSampler; ours yields the same kind of batches
and also remembers where the epoch stands, so a restored checkpoint continues with the very next
batch instead of replaying the epoch, also on another data-parallel world size.

The sample order of an epoch is one global permutation (seeded by seed + epoch, independent of the
world size); rank r takes every world_size-th sample of it, so after each rank has taken p full
batches of b samples the ranks together have consumed exactly the first p * b * world_size samples of
that order. The checkpoint records this global count (`consumed_samples`) and a resumed loader, on
any world size W', continues with the rest of the order from there, again split round-robin (padded
at the end of the epoch by wrapping to the order's start, DistributedSampler's rule):
- the union of the samples all ranks see after the resume is exactly the continuation of the global
  order, so no sample of the epoch is skipped or repeated;
- when W' divides `consumed_samples` (it always does when the global batch size stays the same over
  the resume), every rank receives exactly the batches a straight run on W' ranks would receive.
Otherwise the rank a sample lands on differs from such a straight run (a warning says so); the global
order still continues exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from ds_core.logging import logger
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableBatchSampler", "DSDataLoader"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Index batches of one rank: a seeded global permutation per epoch, continued from a global offset."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if dataset_len < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start = 0  # samples of this epoch's global order consumed before this pass began (a resume)
        self.position = 0  # batches this rank handed out since `start`

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_len))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.dataset_len, generator=g).tolist()

    def _indices(self) -> list[int]:
        """This rank's samples from `start` to the end of the epoch."""
        order = self._order()
        rest = order[self.start:]
        pad = -len(rest) % self.world_size
        rest += (order * (1 + pad // len(order)))[:pad]  # every rank gets the same count (DistributedSampler's rule)
        return rest[self.rank :: self.world_size]

    def _batches(self) -> int:
        per_rank = -(-(self.dataset_len - self.start) // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        """Batches of this pass: a whole epoch, or what was left of it when the pass began at a resume."""
        return self._batches()

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._indices()
        for b in range(self.position, self._batches()):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]

    def next_epoch(self) -> None:
        self.epoch, self.start, self.position = self.epoch + 1, 0, 0

    @property
    def consumed_samples(self) -> int:
        """Samples of this epoch's global order that all ranks together have received."""
        return min(self.dataset_len, self.start + self.position * self.batch_size * self.world_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_samples": self.consumed_samples, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size, "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global offset; the world size and batch size may differ from the saver's."""
        if "consumed_samples" not in state:  # saved before the global count was recorded: batches of this layout
            if "position" not in state:
                raise ValueError(f"data loader state {sorted(state)} has neither 'consumed_samples' nor 'position'")
            state = {**state, "consumed_samples": int(state["position"]) * self.batch_size * self.world_size}
        if int(state.get("dataset_len", self.dataset_len)) != self.dataset_len:
            raise ValueError(f"data loader state is for a dataset of {state['dataset_len']} samples, this one has "
                             f"{self.dataset_len}: the sample order would differ; pass the same training_data")
        consumed = int(state["consumed_samples"])
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.start, self.position = consumed, 0
        if consumed >= self.dataset_len:
            self.next_epoch()
        elif consumed % self.world_size:
            logger.warning(
                f"data loader resumed at global sample {consumed} of epoch {self.epoch} on {self.world_size} ranks: "
                f"{consumed} is not a multiple of {self.world_size}, so the samples continue in the same global "
                "order but reach other ranks than in a run started on this world size"
            )


class DSDataLoader:
    """Iterate to get the rest of the current epoch; iterating again starts the next one."""

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, world_size: int,
                 collate_fn: Callable | None = None, drop_last: bool = False, seed: int = 0,
                 num_workers: int = 0, pin_memory: bool = False, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, rank, world_size, shuffle, seed, drop_last)
        self.collate_fn = collate_fn
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory)
        for batch in loader:
            # count batches the caller received (workers may have prefetched further)
            self.sampler.position += 1
            yield batch
        self.sampler.next_epoch()

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
