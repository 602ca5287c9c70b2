"""The curriculum sampler: batches drawn from the samples inside the current difficulty window.

The window is the intersection, over the curriculum metrics, of the samples whose metric is within
the metric's current difficulty (``value``: metric <= difficulty; ``percentile``: the easiest
difficulty% by metric). Every step the sampler advances the schedules and draws one global batch:

- Within an epoch no sample is drawn twice: the sampler walks a seeded permutation ("segment") of
  the in-window samples not yet drawn this epoch. When the window grows, a new segment starts over
  the not-yet-drawn samples of the new window. When every in-window sample has been drawn, the
  epoch ends and the next one starts from a fresh permutation.
- Every rank computes the same global batch from the seed and keeps its own contiguous share, so
  the ranks' samples are disjoint and their union is the global batch.
- The state (a bitmap of drawn samples at the segment start, the segment's seed and position) is
  O(N / 8) bytes; loading it continues exactly the sequence an uninterrupted run would produce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from ds_core.logging import warn_once

from ds_data.analyzer.index import MetricIndex
from ds_data.config import SEQLEN_METRICS, CurriculumMetricConfig, DataEfficiencyConfig
from ds_data.curriculum.scheduler import CurriculumScheduler

__all__ = ["CurriculumSampler"]

_STATE_VERSION = 1
_READ_CHUNK = 1 << 22


class CurriculumSampler:
    """A `torch.utils.data` batch sampler yielding this rank's micro-batches of sample ids."""

    def __init__(
        self,
        metrics: dict[str, tuple[MetricIndex, CurriculumMetricConfig]],
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        gradient_accumulation_steps: int = 1,
        seed: int = 1234,
        num_epochs: int = 1000,
    ) -> None:
        if not metrics:
            raise ValueError("CurriculumSampler needs at least one metric")
        if min(micro_batch_size, gradient_accumulation_steps, data_parallel_size) < 1:
            raise ValueError(
                "micro_batch_size, gradient_accumulation_steps and data_parallel_size must be >= 1"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        sizes = {name: idx.num_samples for name, (idx, _) in metrics.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"metric indexes cover different numbers of samples: {sizes}")
        self.num_samples = next(iter(sizes.values()))
        self.metrics = metrics
        self.schedulers = {
            name: CurriculumScheduler(
                cfg, integer=cfg.difficulty_type == "value" and idx.index_to_metric.dtype.kind in "iu"
            )
            for name, (idx, cfg) in metrics.items()
        }
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.rank, self.world_size = data_parallel_rank, data_parallel_size
        self.local_batch_size = micro_batch_size * gradient_accumulation_steps
        self.global_batch_size = self.local_batch_size * data_parallel_size
        self.seed, self.num_epochs = seed, num_epochs
        # progress
        self.curriculum_step = 0
        self.epoch = 0
        self.drawn = np.zeros(self.num_samples, dtype=bool)
        self._segment_counter = 0
        self._seg_start_drawn: np.ndarray = self.drawn.copy()
        self._seg_difficulties: dict[str, float] | None = None
        self._seg_seed: tuple[int, ...] = ()
        self._order = np.empty(0, dtype=np.int64)
        self._pos = 0
        self._window_cache: tuple[dict[str, float], np.ndarray] | None = None
        self._window_size = -1

    @classmethod
    def from_config(
        cls,
        config: DataEfficiencyConfig,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        gradient_accumulation_steps: int = 1,
    ) -> CurriculumSampler:
        """Build from a validated ``data_efficiency`` section (its non-seqlen curriculum metrics)."""
        cl = config.data_sampling.curriculum_learning
        if cl.data_cluster_path:
            warn_once(
                "data_sampling.curriculum_learning.data_cluster_path is not used: ds-data computes the window from "
                "the index files and writes no cluster files"
            )
        metrics = {}
        for name, cfg in cl.curriculum_metrics.items():
            if name in SEQLEN_METRICS:
                continue
            index = MetricIndex(cfg.index_to_sample_path)
            if (
                cfg.index_to_metric_path is not None
                and MetricIndex(cfg.index_to_metric_path).path != index.path
            ):
                raise ValueError(
                    f"curriculum_metrics.{name}: index_to_metric_path and index_to_sample_path must name the same "
                    f"ds-data index directory ({index.path})"
                )
            metrics[name] = (index, cfg)
        return cls(
            metrics,
            micro_batch_size,
            data_parallel_rank,
            data_parallel_size,
            gradient_accumulation_steps,
            seed=config.seed,
            num_epochs=config.data_sampling.num_epochs,
        )

    def set_custom_get_difficulty(self, metric: str, fn: Callable[[int], float]) -> None:
        """The step -> difficulty function of a metric whose schedule_type is 'custom'."""
        if metric not in self.schedulers:
            raise KeyError(f"no curriculum metric '{metric}' (metrics: {', '.join(self.schedulers)})")
        self.schedulers[metric].set_custom_get_difficulty(fn)

    # -- window ------------------------------------------------------------------------------
    def _difficulties(self, step: int) -> dict[str, float]:
        return {name: s.update_difficulty(step) for name, s in self.schedulers.items()}

    def window(self, difficulties: dict[str, float]) -> np.ndarray:
        """Boolean mask of the samples inside the window of these difficulties."""
        if self._window_cache is not None and self._window_cache[0] == difficulties:
            return self._window_cache[1]
        mask = np.ones(self.num_samples, dtype=bool)
        for name, (index, cfg) in self.metrics.items():
            if cfg.clustering_type == "single_cluster":
                continue
            d = difficulties[name]
            count = (
                index.count_up_to_value(d)
                if cfg.difficulty_type == "value"
                else index.count_up_to_percentile(d)
            )
            inside = np.zeros(self.num_samples, dtype=bool)
            for start in range(0, count, _READ_CHUNK):  # read the memmap in pieces, not 8 bytes x N at once
                inside[np.asarray(index.index_to_sample[start : min(count, start + _READ_CHUNK)])] = True
            mask &= inside
        self._window_cache = (dict(difficulties), mask)
        self._window_size = int(mask.sum())  # counted once per window, not once per step
        return mask

    def current_difficulties(self) -> dict[str, float]:
        return {name: s.get_current_difficulty() for name, s in self.schedulers.items()}

    # -- drawing -----------------------------------------------------------------------------
    def _start_segment(self, difficulties: dict[str, float]) -> None:
        window = self.window(difficulties)
        self._segment_counter += 1
        self._seg_start_drawn = self.drawn.copy()
        self._seg_difficulties = dict(difficulties)
        self._seg_seed = (self.seed, self.epoch, self._segment_counter)
        self._order = self._segment_order(window, self._seg_start_drawn, self._seg_seed)
        self._pos = 0

    @staticmethod
    def _segment_order(window: np.ndarray, drawn: np.ndarray, seed: tuple[int, ...]) -> np.ndarray:
        candidates = np.flatnonzero(window & ~drawn)
        return np.random.default_rng(list(seed)).permutation(candidates)

    def next_global_batch(self) -> np.ndarray:
        """Advance one step and return the whole global batch (every rank gets the same array)."""
        if self.epoch >= self.num_epochs:
            raise StopIteration
        self.curriculum_step += 1
        difficulties = self._difficulties(self.curriculum_step)
        if difficulties != self._seg_difficulties:
            self._start_segment(difficulties)
        if self._window_size == 0:
            raise RuntimeError(
                f"the curriculum window is empty at step {self.curriculum_step} (difficulties {difficulties}): no sample "
                "is that easy; raise min_difficulty"
            )
        batch = np.empty(self.global_batch_size, dtype=np.int64)
        filled = 0
        while filled < self.global_batch_size:
            if self._pos == self._order.shape[0]:
                if not (self.window(difficulties) & ~self.drawn).any():
                    self.epoch += 1
                    self.drawn[:] = False
                    if self.epoch >= self.num_epochs:
                        raise StopIteration
                self._start_segment(difficulties)
            take = min(self.global_batch_size - filled, self._order.shape[0] - self._pos)
            ids = self._order[self._pos : self._pos + take]
            batch[filled : filled + take] = ids
            self.drawn[ids] = True
            self._pos += take
            filled += take
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            try:
                batch = self.next_global_batch()
            except StopIteration:
                return
            local = batch[self.rank * self.local_batch_size : (self.rank + 1) * self.local_batch_size]
            for m in range(self.gradient_accumulation_steps):
                yield local[m * self.micro_batch_size : (m + 1) * self.micro_batch_size].tolist()

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position after the batches yielded so far (a DataLoader that prefetches runs ahead of training)."""
        return {
            "version": _STATE_VERSION,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "curriculum_step": self.curriculum_step,
            "epoch": self.epoch,
            "segment_counter": self._segment_counter,
            "segment_difficulties": self._seg_difficulties,
            # a tensor, so torch.save and JSON-tree checkpoint writers both carry it
            "segment_start_drawn": torch.from_numpy(np.packbits(self._seg_start_drawn)),
            "segment_position": self._pos,
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')}, expected {_STATE_VERSION}")
        for key, mine in (
            ("num_samples", self.num_samples),
            ("global_batch_size", self.global_batch_size),
            ("seed", self.seed),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"sampler checkpoint has {key}={state[key]} but this sampler has {mine}; the sample order would "
                    "differ (the data-parallel size may change only if the global batch size stays the same)"
                )
        if set(state["schedulers"]) != set(self.schedulers):
            raise ValueError(
                f"sampler checkpoint metrics {sorted(state['schedulers'])} != {sorted(self.schedulers)}"
            )
        self.curriculum_step = int(state["curriculum_step"])
        self.epoch = int(state["epoch"])
        self._segment_counter = int(state["segment_counter"])
        for name, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][name])
        self._seg_start_drawn = np.unpackbits(state["segment_start_drawn"], count=self.num_samples).astype(
            bool
        )
        self._seg_difficulties = state["segment_difficulties"]
        self.drawn = self._seg_start_drawn.copy()
        self._pos = int(state["segment_position"])
        if self._seg_difficulties is None:
            self._order = np.empty(0, dtype=np.int64)
            return
        self._seg_seed = (self.seed, self.epoch, self._segment_counter)
        window = self.window(self._seg_difficulties)
        self._order = self._segment_order(window, self._seg_start_drawn, self._seg_seed)
        self.drawn[self._order[: self._pos]] = True
