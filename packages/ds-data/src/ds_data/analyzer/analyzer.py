"""The data analyzer: a resumable multi-process map-reduce that turns a dataset into metric indexes.

Map: the samples are cut into chunks of `chunk_size`; worker processes compute every metric of a
chunk and write one small ``.npy`` per metric (atomically), so an interrupted run resumes from the
chunks already on disk. Metrics that need dataset-wide token counts (``vocab_rarity``) run in a
second map phase after the counts are reduced. Reduce: per metric, the chunk files are streamed
into one memmap and indexed by `build_index` within `memory_limit_bytes`.

Several machines can share the map (`shard_id` / `num_shards`, each the same `save_path` on a
shared file system); one of them runs `reduce()` afterwards.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ds_core.logging import logger
from numpy.lib.format import open_memmap

from ds_data.analyzer.index import MetricIndex, build_index
from ds_data.analyzer.metrics import Metric, resolve_metrics, sample_tokens

__all__ = ["DataAnalyzer"]

_COUNTS = "_token_counts"

# worker-process globals, set by _init_worker (inherited under fork, pickled under spawn)
_W: dict[str, Any] = {}


def _init_worker(dataset, metrics, save_path, counts_path) -> None:
    _W["dataset"], _W["metrics"], _W["save"] = dataset, metrics, Path(save_path)
    _W["counts"], _W["total"] = None, 0
    if counts_path is not None:
        _W["counts"] = np.load(counts_path)
        _W["total"] = int(_W["counts"].sum())


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _chunk_file(save: Path, metric: str, start: int) -> Path:
    return save / "map" / metric / f"{start:014d}.npy"


def _map_chunk(task: tuple[int, int, bool]) -> int:
    """Compute one chunk [start, end) for every metric of the phase; returns the sample count."""
    start, end, count_tokens = task
    dataset, metrics, save = _W["dataset"], _W["metrics"], _W["save"]
    values = {m.name: np.empty(end - start, dtype=m.dtype) for m in metrics}
    counts = np.zeros(0, dtype=np.int64)
    for j, i in enumerate(range(start, end)):
        sample = dataset[i]
        for m in metrics:
            values[m.name][j] = m.compute(sample, _W["counts"], _W["total"])
        if count_tokens:
            tokens = sample_tokens(sample)
            if tokens.size and tokens.min() < 0:
                raise ValueError(f"sample {i} has negative token ids")
            add = np.bincount(tokens)
            if add.shape[0] > counts.shape[0]:
                counts = np.pad(counts, (0, add.shape[0] - counts.shape[0]))
            counts[: add.shape[0]] += add
    for name, arr in values.items():
        _save_atomic(_chunk_file(save, name, start), arr)
    if count_tokens:
        _save_atomic(_chunk_file(save, _COUNTS, start), counts)
    return end - start


class DataAnalyzer:
    """Compute per-sample metrics of `dataset` and write one `MetricIndex` directory per metric.

    `dataset`: anything with ``len()`` and ``[i]`` returning token ids (see `metrics.sample_tokens`).
    `metrics`: built-in names (``"seqlen"``, ``"vocab_rarity"``) or `Metric(name, fn, dtype)`.
    `memory_limit_bytes`: cap on the reduce step's working set (sort runs, merge blocks); None = in memory.
    """

    def __init__(
        self,
        dataset: Sequence,
        metrics: list[str | Metric],
        save_path: str | os.PathLike,
        num_workers: int = 1,
        chunk_size: int = 4096,
        memory_limit_bytes: int | None = None,
        mp_context: str | None = None,
        shard_id: int = 0,
        num_shards: int = 1,
        progress: Callable[[str], None] | None = None,
        progress_interval_s: float = 5.0,
    ) -> None:
        if num_workers < 1 or chunk_size < 1:
            raise ValueError(f"num_workers and chunk_size must be >= 1, got {num_workers} and {chunk_size}")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
        self.dataset = dataset
        self.metrics = resolve_metrics(metrics)
        self.save_path = Path(save_path)
        self.num_samples = len(dataset)
        self.num_workers = num_workers
        self.chunk_size = chunk_size
        self.memory_limit_bytes = memory_limit_bytes
        self.mp_context = mp_context or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.shard_id, self.num_shards = shard_id, num_shards
        self.progress = progress or logger.info
        self.progress_interval_s = progress_interval_s
        self.reduce_stats: dict[str, dict] = {}

    # -- public ------------------------------------------------------------------------------
    def run(self) -> dict[str, MetricIndex]:
        """Map (resuming from chunks on disk) then reduce; returns the opened indexes."""
        self.map()
        return self.reduce()

    def map(self) -> None:
        self._check_manifest()
        plain = [m for m in self.metrics if not m.needs_token_counts]
        rare = [m for m in self.metrics if m.needs_token_counts]
        self._run_phase("map", plain, count_tokens=bool(rare), counts_path=None)
        if rare:
            counts_path = self._reduce_token_counts()
            self._run_phase("map (vocab rarity)", rare, count_tokens=False, counts_path=counts_path)

    def reduce(self) -> dict[str, MetricIndex]:
        self._check_manifest()
        out = {}
        for m in self.metrics:
            final = self.save_path / m.name
            if not (final / "meta.json").is_file():
                missing = [
                    s
                    for s, _ in self._chunks(all_shards=True)
                    if not _chunk_file(self.save_path, m.name, s).is_file()
                ]
                if missing:
                    raise RuntimeError(
                        f"metric '{m.name}': {len(missing)} map chunks are missing (first at sample {missing[0]}); "
                        "run map() on every shard first"
                    )
                self.reduce_stats[m.name] = self._reduce_metric(m, final)
            out[m.name] = MetricIndex(final)
        return out

    # -- map ---------------------------------------------------------------------------------
    def _chunks(self, all_shards: bool = False) -> list[tuple[int, int]]:
        chunks = [
            (s, min(s + self.chunk_size, self.num_samples))
            for s in range(0, self.num_samples, self.chunk_size)
        ]
        if all_shards:
            return chunks
        return [c for k, c in enumerate(chunks) if k % self.num_shards == self.shard_id]

    def _check_manifest(self) -> None:
        manifest = {
            "num_samples": self.num_samples,
            "chunk_size": self.chunk_size,
            "metrics": {m.name: str(np.dtype(m.dtype)) for m in self.metrics},
        }
        path = self.save_path / "manifest.json"
        self.save_path.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            old = json.loads(path.read_text())
            clash = {k for k in ("num_samples", "chunk_size") if old.get(k) != manifest[k]}
            clash |= {f"metric {n}" for n, d in manifest["metrics"].items() if old["metrics"].get(n, d) != d}
            if clash:
                raise ValueError(
                    f"{self.save_path} holds a run with different {', '.join(sorted(clash))} ({old}); use another "
                    "save_path or delete it to start over"
                )
            manifest["metrics"] = {**old["metrics"], **manifest["metrics"]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)

    def _run_phase(
        self, label: str, metrics: list[Metric], count_tokens: bool, counts_path: Path | None
    ) -> None:
        if not metrics and not count_tokens:
            return
        names = [m.name for m in metrics] + ([_COUNTS] if count_tokens else [])
        for name in names:
            (self.save_path / "map" / name).mkdir(parents=True, exist_ok=True)
        chunks = self._chunks()
        todo = [
            (s, e, count_tokens)
            for s, e in chunks
            if not all(_chunk_file(self.save_path, n, s).is_file() for n in names)
        ]
        total = sum(e - s for s, e in chunks)
        done = total - sum(e - s for s, e, _ in todo)
        if done:
            self.progress(f"analyzer {label}: resuming, {done}/{total} samples already on disk")
        args = (self.dataset, metrics, str(self.save_path), None if counts_path is None else str(counts_path))
        started, last = time.monotonic(), 0.0
        processed = 0

        def report(force: bool = False) -> None:
            nonlocal last
            now = time.monotonic()
            if force or now - last >= self.progress_interval_s:
                rate = processed / max(now - started, 1e-9)
                left = (total - done - processed) / rate if rate > 0 else math.inf
                self.progress(
                    f"analyzer {label}: {done + processed}/{total} samples ({100 * (done + processed) / max(total, 1):.0f}%), "
                    f"{rate:.0f} samples/s, ~{left:.0f}s left"
                )
                last = now

        if self.num_workers == 1 or len(todo) <= 1:
            _init_worker(*args)
            for task in todo:
                processed += _map_chunk(task)
                report()
        else:
            ctx = mp.get_context(self.mp_context)
            with ctx.Pool(min(self.num_workers, len(todo)), initializer=_init_worker, initargs=args) as pool:
                for n in pool.imap_unordered(_map_chunk, todo):
                    processed += n
                    report()
        report(force=True)

    def _reduce_token_counts(self) -> Path:
        out = self.save_path / "token_counts.npy"
        counts = np.zeros(0, dtype=np.int64)
        for s, _ in self._chunks(all_shards=True):
            f = _chunk_file(self.save_path, _COUNTS, s)
            if not f.is_file():
                raise RuntimeError(
                    f"token counts of the chunk at sample {s} are missing; run map() on every shard first"
                )
            add = np.load(f)
            if add.shape[0] > counts.shape[0]:
                counts = np.pad(counts, (0, add.shape[0] - counts.shape[0]))
            counts[: add.shape[0]] += add
        _save_atomic(out, counts)
        return out

    # -- reduce ------------------------------------------------------------------------------
    def _reduce_metric(self, metric: Metric, final: Path) -> dict:
        values_path = self.save_path / f"{metric.name}.values.tmp.npy"
        values = open_memmap(values_path, mode="w+", dtype=metric.dtype, shape=(self.num_samples,))
        for s, e in self._chunks(all_shards=True):
            chunk = np.load(_chunk_file(self.save_path, metric.name, s))
            if chunk.shape[0] != e - s:
                raise RuntimeError(
                    f"metric '{metric.name}': chunk at sample {s} has {chunk.shape[0]} values, expected {e - s}"
                )
            values[s:e] = chunk
        values.flush()
        started = time.monotonic()
        stats = build_index(values, final, metric.name, self.memory_limit_bytes, progress=self.progress)
        del values
        os.remove(values_path)
        self.progress(
            f"analyzer reduce: '{metric.name}' indexed {self.num_samples} samples, {stats['unique']} distinct values, "
            f"{stats['runs']} sort run(s), {time.monotonic() - started:.1f}s"
        )
        return stats

    def cleanup_map_files(self) -> None:
        """Delete the per-chunk map outputs (after a successful reduce)."""
        shutil.rmtree(self.save_path / "map", ignore_errors=True)
