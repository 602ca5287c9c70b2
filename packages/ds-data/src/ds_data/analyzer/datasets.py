"""A memory-mapped token dataset: one flat token array plus sample offsets, both ``.npy`` files.

Sample ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``. Nothing is loaded until a sample is read, so
the analyzer's worker processes can share a dataset far larger than memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

__all__ = ["FlatTokenDataset", "write_flat_token_dataset"]


class FlatTokenDataset:
    def __init__(self, tokens_path: str | os.PathLike, offsets_path: str | os.PathLike) -> None:
        self.tokens_path, self.offsets_path = str(tokens_path), str(offsets_path)
        self._open()
        if self.offsets.ndim != 1 or self.offsets.shape[0] < 1 or self.offsets[0] != 0:
            raise ValueError(f"{offsets_path}: offsets must be a 1-D array starting at 0")
        if int(self.offsets[-1]) != self.tokens.shape[0]:
            raise ValueError(
                f"{offsets_path}: last offset {int(self.offsets[-1])} != number of tokens {self.tokens.shape[0]} in "
                f"{tokens_path}"
            )

    def _open(self) -> None:
        self.tokens = np.load(self.tokens_path, mmap_mode="r")
        self.offsets = np.load(self.offsets_path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.offsets.shape[0]) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i %= len(self)
        return np.asarray(self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])])

    # memmaps are reopened in each worker process instead of being pickled
    def __getstate__(self) -> dict:
        return {"tokens_path": self.tokens_path, "offsets_path": self.offsets_path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()


def write_flat_token_dataset(
    samples: Iterable, out_dir: str | os.PathLike, dtype=np.int32
) -> FlatTokenDataset:
    """Write token sequences as ``tokens.npy`` + ``offsets.npy`` in `out_dir` (two streaming passes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = list(samples) if not isinstance(samples, (list, tuple)) else samples
    lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = open_memmap(out_dir / "tokens.tmp.npy", mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
    for s, a, b in zip(samples, offsets[:-1], offsets[1:]):
        tokens[a:b] = np.asarray(s, dtype=dtype)
    tokens.flush()
    del tokens
    np.save(out_dir / "offsets.tmp.npy", offsets)
    os.replace(out_dir / "tokens.tmp.npy", out_dir / "tokens.npy")
    os.replace(out_dir / "offsets.tmp.npy", out_dir / "offsets.npy")
    return FlatTokenDataset(out_dir / "tokens.npy", out_dir / "offsets.npy")
