"""The engine's data loader: a rank's share of the dataset, shuffled per epoch, resumable mid-epoch.

DeepSpeed's loader is a DataLoader over a DistributedSampler; ours yields the same kind of batches
and also remembers (epoch, batches consumed), so a restored checkpoint continues with the very next
batch instead of replaying the epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableBatchSampler", "DSDataLoader"]


class ResumableBatchSampler(Sampler[list[int]]):
    """Index batches of one rank: a seeded permutation per epoch, padded to a multiple of the world size."""

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if dataset_len < 1:
            raise ValueError("the training dataset is empty")
        self.dataset_len, self.batch_size = dataset_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = -(-self.dataset_len // self.world_size) * self.world_size
        order += order[: total - len(order)]  # every rank gets the same count (DistributedSampler's rule)
        return order[self.rank : total : self.world_size]

    def __len__(self) -> int:
        per_rank = -(-self.dataset_len // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        mine = self._indices()
        for b in range(self.position, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


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
        self.sampler.epoch += 1
        self.sampler.position = 0

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
