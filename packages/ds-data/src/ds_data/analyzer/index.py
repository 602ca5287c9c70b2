"""Metric index files: metric value -> sample ids, as numpy ``.npy`` memmaps that need not fit in memory.

One directory per metric:

- ``sample_to_metric.npy``  ``[N]``   the metric of every sample
- ``index_to_sample.npy``   ``[N]``   sample ids sorted by (metric, sample id)
- ``index_to_metric.npy``   ``[U]``   the distinct metric values, ascending
- ``index_offsets.npy``     ``[U+1]`` samples with value ``index_to_metric[i]`` are
  ``index_to_sample[index_offsets[i]:index_offsets[i+1]]``
- ``meta.json``             name, counts, dtypes, format version (written last: its presence means complete)

`build_index` sorts in memory when the working set fits the memory limit and otherwise with an
external merge sort over sorted runs; both give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

__all__ = ["INDEX_FORMAT_VERSION", "MetricIndex", "build_index"]

INDEX_FORMAT_VERSION = 1
_FAN_IN = 8  # runs merged at once; more passes, but each keeps large buffers
_PAIR_OVERHEAD = 4  # values + ids + sort permutation + gathered copies, in units of one (value, id) pair


def _pair_bytes(dtype: np.dtype) -> int:
    return np.dtype(dtype).itemsize + 8


def build_index(
    sample_to_metric: np.ndarray,
    out_dir: str | os.PathLike,
    name: str,
    memory_limit_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Write the index of `sample_to_metric` (an array or memmap) into `out_dir` atomically.

    Returns stats: ``{"runs": number of sorted runs (1 = in memory), "unique": U}``.
    """
    out_dir = Path(out_dir)
    values = np.asarray(sample_to_metric) if not isinstance(sample_to_metric, np.memmap) else sample_to_metric
    if values.ndim != 1:
        raise ValueError(f"metric '{name}': expected one value per sample, got shape {values.shape}")
    if values.dtype.kind == "f" and np.isnan(values).any():
        raise ValueError(f"metric '{name}' has NaN values; a curriculum needs comparable values")
    n = int(values.shape[0])
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s2m = open_memmap(tmp / "sample_to_metric.npy", mode="w+", dtype=values.dtype, shape=(n,))
    per_run = _run_length(values.dtype, memory_limit_bytes)
    for start in range(0, n, per_run):
        s2m[start : start + per_run] = values[start : start + per_run]
    s2m.flush()
    sorted_ids = open_memmap(tmp / "index_to_sample.npy", mode="w+", dtype=np.int64, shape=(n,))
    runs = 1
    if n <= per_run:
        order = np.argsort(np.asarray(s2m), kind="stable")  # stable: ties keep ascending sample ids
        sorted_ids[:] = order
    else:
        runs = _external_sort(s2m, sorted_ids, per_run, tmp, progress)
    sorted_ids.flush()
    unique = _write_value_offsets(s2m, sorted_ids, tmp, per_run)
    meta = {
        "name": name,
        "num_samples": n,
        "num_values": unique,
        "metric_dtype": str(values.dtype),
        "format_version": INDEX_FORMAT_VERSION,
    }
    del s2m, sorted_ids
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return {"runs": runs, "unique": unique}


def _run_length(dtype: np.dtype, memory_limit_bytes: int | None) -> int:
    if memory_limit_bytes is None:
        return 1 << 62
    return max(16, int(memory_limit_bytes) // (_PAIR_OVERHEAD * _pair_bytes(dtype)))


def _external_sort(s2m: np.ndarray, out_ids: np.ndarray, per_run: int, tmp: Path, progress) -> int:
    """Sort (value, id) pairs in runs of `per_run`, then merge the runs block by block."""
    n = s2m.shape[0]
    run_dir = tmp / "runs"
    run_dir.mkdir()
    runs = []
    for r, start in enumerate(range(0, n, per_run)):
        vals = np.array(s2m[start : start + per_run])
        order = np.argsort(vals, kind="stable")
        v_path, i_path = run_dir / f"v{r}.npy", run_dir / f"i{r}.npy"
        np.save(v_path, vals[order])
        np.save(i_path, (order + start).astype(np.int64))
        runs.append((v_path, i_path))
    if progress:
        progress(f"external sort: {len(runs)} sorted runs of up to {per_run} samples; merging")
    first_runs = len(runs)
    # merge at most _FAN_IN runs at a time so every run's buffer stays a useful size under the cap
    level = 0
    while len(runs) > _FAN_IN:
        level += 1
        merged = []
        for g in range(0, len(runs), _FAN_IN):
            group = runs[g : g + _FAN_IN]
            size = sum(np.load(v, mmap_mode="r").shape[0] for v, _ in group)
            v_path, i_path = run_dir / f"v{level}_{g}.npy", run_dir / f"i{level}_{g}.npy"
            out_v = open_memmap(v_path, mode="w+", dtype=s2m.dtype, shape=(size,))
            out_i = open_memmap(i_path, mode="w+", dtype=np.int64, shape=(size,))
            _merge_runs(group, out_i, max(1, per_run // (len(group) + 1)), out_v)
            out_v.flush()
            out_i.flush()
            del out_v, out_i
            for v, i in group:
                os.remove(v)
                os.remove(i)
            merged.append((v_path, i_path))
        runs = merged
    _merge_runs(runs, out_ids, max(1, per_run // (len(runs) + 1)))
    shutil.rmtree(run_dir)
    return first_runs


def _merge_runs(
    runs: list[tuple[Path, Path]], out_ids: np.ndarray, block: int, out_vals: np.ndarray | None = None
) -> None:
    """k-way merge with bounded memory: each round emits every loaded pair <= the smallest buffer end.

    Every run keeps a buffer of up to `block` pairs, topped up after each round, so a round emits
    about half of all buffered pairs and the merge costs O(N / block) rounds of vectorized work.
    """
    files = [(np.load(v, mmap_mode="r"), np.load(i, mmap_mode="r")) for v, i in runs]
    ends = [min(block, f[0].shape[0]) for f in files]  # file position after each run's buffer
    bufs = [(np.array(f[0][:e]), np.array(f[1][:e])) for f, e in zip(files, ends)]
    written = 0
    while True:
        live = [k for k in range(len(files)) if bufs[k][0].shape[0] > 0]
        if not live:
            break
        # the smallest "last buffered pair" across runs bounds what is safe to emit now
        cut_v, cut_i = min((bufs[k][0][-1], bufs[k][1][-1]) for k in live)
        take_v, take_i = [], []
        for k in live:
            vals, ids = bufs[k]
            lo = int(np.searchsorted(vals, cut_v, side="left"))
            hi = int(np.searchsorted(vals, cut_v, side="right"))
            count = lo + int(np.searchsorted(ids[lo:hi], cut_i, side="right"))
            take_v.append(vals[:count])
            take_i.append(ids[:count])
            more = min(count, files[k][0].shape[0] - ends[k])
            bufs[k] = (
                np.concatenate([vals[count:], files[k][0][ends[k] : ends[k] + more]]),
                np.concatenate([ids[count:], files[k][1][ends[k] : ends[k] + more]]),
            )
            ends[k] += more
        v = np.concatenate(take_v)
        i = np.concatenate(take_i)
        order = np.lexsort((i, v))
        out_ids[written : written + order.shape[0]] = i[order]
        if out_vals is not None:
            out_vals[written : written + order.shape[0]] = v[order]
        written += order.shape[0]
    if written != out_ids.shape[0]:
        raise RuntimeError(f"external merge wrote {written} of {out_ids.shape[0]} samples")


def _write_value_offsets(s2m: np.ndarray, sorted_ids: np.ndarray, tmp: Path, chunk: int) -> int:
    """Two streaming passes over the sorted values: count distinct values, then write them and offsets."""
    n = s2m.shape[0]
    chunk = max(1, min(chunk, n or 1))

    def sorted_values(start: int) -> np.ndarray:
        return np.asarray(s2m[np.asarray(sorted_ids[start : start + chunk])])

    def boundaries():
        prev = None
        for start in range(0, n, chunk):
            vals = sorted_values(start)
            new = np.ones(vals.shape[0], dtype=bool)
            new[1:] = vals[1:] != vals[:-1]
            if prev is not None:
                new[0] = vals[0] != prev
            prev = vals[-1]
            yield start, vals, np.flatnonzero(new)

    unique = sum(int(b.shape[0]) for _, _, b in boundaries())
    values = open_memmap(tmp / "index_to_metric.npy", mode="w+", dtype=s2m.dtype, shape=(unique,))
    offsets = open_memmap(tmp / "index_offsets.npy", mode="w+", dtype=np.int64, shape=(unique + 1,))
    at = 0
    for start, vals, new in boundaries():
        values[at : at + new.shape[0]] = vals[new]
        offsets[at : at + new.shape[0]] = new + start
        at += new.shape[0]
    offsets[unique] = n
    values.flush()
    offsets.flush()
    return unique


class MetricIndex:
    """Read-only view of one metric's index directory (memory-mapped)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_file():  # DeepSpeed configs point at files; accept any file inside the directory
            path = path.parent
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no complete metric index at {path} (meta.json missing): run DataAnalyzer to build it, or finish "
                "the interrupted run (it resumes)"
            )
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise ValueError(
                f"{path}: index format {self.meta.get('format_version')}, expected {INDEX_FORMAT_VERSION}"
            )
        self.path = path
        self.name: str = self.meta["name"]
        self.num_samples: int = int(self.meta["num_samples"])
        self.sample_to_metric = np.load(path / "sample_to_metric.npy", mmap_mode="r")
        self.index_to_sample = np.load(path / "index_to_sample.npy", mmap_mode="r")
        self.index_to_metric = np.load(path / "index_to_metric.npy", mmap_mode="r")
        self.index_offsets = np.load(path / "index_offsets.npy", mmap_mode="r")
        if (
            self.sample_to_metric.shape[0] != self.num_samples
            or self.index_to_sample.shape[0] != self.num_samples
        ):
            raise ValueError(f"{path}: index files disagree with meta.json ({self.num_samples} samples)")

    def samples_with_value(self, value: float) -> np.ndarray:
        """Sample ids whose metric equals `value` (empty if none)."""
        i = int(np.searchsorted(self.index_to_metric, value))
        if i >= self.index_to_metric.shape[0] or self.index_to_metric[i] != value:
            return np.empty(0, dtype=np.int64)
        return np.asarray(self.index_to_sample[self.index_offsets[i] : self.index_offsets[i + 1]])

    def count_up_to_value(self, value: float) -> int:
        """How many samples have metric <= `value` (they are the first ones of index_to_sample)."""
        i = int(np.searchsorted(self.index_to_metric, value, side="right"))
        return int(self.index_offsets[i])

    def count_up_to_percentile(self, percentile: float) -> int:
        """How many samples form the easiest `percentile` percent (rounded up)."""
        return int(min(self.num_samples, np.ceil(self.num_samples * percentile / 100.0)))
