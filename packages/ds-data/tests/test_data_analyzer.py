"""Data analyzer: metric values, index layout, multi-process = single process, memory cap = in memory, resume."""

import json
import math

import numpy as np
import pytest
from ds_data.analyzer import DataAnalyzer, Metric, MetricIndex, build_index


def make_dataset(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 300, size=int(rng.integers(1, 50))) for _ in range(n)]


def first_token_mod(sample):
    return int(np.asarray(sample)[0]) % 5


def index_files(path):
    return {
        f: np.load(path / f)
        for f in ("sample_to_metric.npy", "index_to_sample.npy", "index_to_metric.npy", "index_offsets.npy")
    }


def test_metrics_and_index_match_a_direct_computation(tmp_path):
    data = make_dataset(500)
    idx = DataAnalyzer(
        data, ["seqlen", "vocab_rarity", Metric("first", first_token_mod, np.int64)], tmp_path, chunk_size=64
    ).run()
    lengths = np.array([len(s) for s in data])
    assert np.array_equal(idx["seqlen"].sample_to_metric, lengths)
    counts = np.bincount(np.concatenate(data))
    total = counts.sum()
    rarity = [np.mean([math.log(total / counts[t]) for t in s]) for s in data]
    np.testing.assert_allclose(idx["vocab_rarity"].sample_to_metric, rarity, rtol=1e-12)
    seq = idx["seqlen"]
    # index_to_sample is sorted by (value, sample id); offsets delimit each value's samples
    order = np.lexsort((np.arange(500), lengths))
    assert np.array_equal(seq.index_to_sample, order)
    assert np.array_equal(seq.index_to_metric, np.unique(lengths))
    assert np.array_equal(seq.samples_with_value(7), np.flatnonzero(lengths == 7))
    assert seq.count_up_to_value(10) == int((lengths <= 10).sum())
    assert seq.count_up_to_percentile(25) == math.ceil(500 * 0.25)
    assert json.loads((tmp_path / "seqlen" / "meta.json").read_text())["num_samples"] == 500


def test_multiprocess_map_equals_single_process(tmp_path):
    data = make_dataset(2000)
    metrics = ["seqlen", "vocab_rarity", Metric("first", first_token_mod, np.int64)]
    DataAnalyzer(data, metrics, tmp_path / "one", num_workers=1, chunk_size=300).run()
    DataAnalyzer(data, metrics, tmp_path / "two", num_workers=2, chunk_size=300).run()
    for name in ("seqlen", "vocab_rarity", "first"):
        a, b = index_files(tmp_path / "one" / name), index_files(tmp_path / "two" / name)
        for f in a:
            assert np.array_equal(a[f], b[f]), (name, f)


def test_memory_capped_run_equals_in_memory_run(tmp_path):
    """A cap far below the data size forces an external multi-pass merge sort; the files must not change."""
    data = make_dataset(6000, seed=1)
    metrics = ["seqlen", "vocab_rarity"]
    DataAnalyzer(data, metrics, tmp_path / "mem", chunk_size=1000).run()
    cap = 16_000  # bytes: a (value, id) pair is 16 bytes, so ~250 samples per sorted run vs 6000 samples
    capped = DataAnalyzer(data, metrics, tmp_path / "cap", chunk_size=1000, memory_limit_bytes=cap)
    capped.run()
    assert all(s["runs"] > 8 for s in capped.reduce_stats.values()), (
        capped.reduce_stats
    )  # > fan-in: 2 merge passes
    for name in metrics:
        a, b = index_files(tmp_path / "mem" / name), index_files(tmp_path / "cap" / name)
        for f in a:
            assert np.array_equal(a[f], b[f]), (name, f)


def test_build_index_external_sort_with_heavy_ties(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 4, size=5000).astype(np.int32)
    stats = build_index(values, tmp_path / "ties", "ties", memory_limit_bytes=2000)
    assert stats["runs"] > 1
    idx = MetricIndex(tmp_path / "ties")
    assert np.array_equal(idx.index_to_sample, np.lexsort((np.arange(5000), values)))
    assert np.array_equal(np.diff(idx.index_offsets), np.bincount(values))


class Boom(RuntimeError):
    pass


def test_interrupted_map_resumes_from_finished_chunks(tmp_path):
    data = make_dataset(1000)
    calls = []

    def fragile(sample):
        if len(calls) >= 450:
            raise Boom("simulated crash")
        calls.append(1)
        return len(sample)

    with pytest.raises(Boom):
        DataAnalyzer(data, [Metric("len", fragile, np.int64)], tmp_path, chunk_size=100).run()
    assert len(list((tmp_path / "map" / "len").glob("*.npy"))) == 4  # 4 whole chunks survived
    assert not (tmp_path / "len" / "meta.json").exists()
    calls.clear()

    def counting(sample):
        calls.append(1)
        return len(sample)

    messages = []
    idx = DataAnalyzer(
        data, [Metric("len", counting, np.int64)], tmp_path, chunk_size=100, progress=messages.append
    ).run()
    assert len(calls) == 600  # only the 6 missing chunks were recomputed
    assert any("resuming, 400/1000" in m for m in messages)
    assert np.array_equal(idx["len"].sample_to_metric, [len(s) for s in data])


def test_bad_inputs_give_clear_errors(tmp_path):
    data = make_dataset(100)
    DataAnalyzer(data, ["seqlen"], tmp_path / "a", chunk_size=10).run()
    with pytest.raises(ValueError, match="different chunk_size"):
        DataAnalyzer(data, ["seqlen"], tmp_path / "a", chunk_size=20).run()
    with pytest.raises(ValueError, match="unknown metric 'seqlenn'"):
        DataAnalyzer(data, ["seqlenn"], tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        MetricIndex(tmp_path / "nothing")
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.array([1.0, np.nan]), tmp_path / "nan", "nan")
    with pytest.raises(TypeError, match="integer token ids"):
        DataAnalyzer([np.array([0.5, 1.5])], ["seqlen"], tmp_path / "c").run()


def test_capped_index_build_stays_under_the_cap(tmp_path):
    """numpy reports its allocations to tracemalloc; memmapped files (page cache) do not count."""
    import tracemalloc

    n = 400_000  # 6.4 MB of (value, id) pairs
    values = np.lib.format.open_memmap(tmp_path / "values.npy", mode="w+", dtype=np.int64, shape=(n,))
    values[:] = np.random.default_rng(0).integers(0, 1000, size=n)
    values.flush()
    cap = 1 << 20
    peaks = {}
    for name, limit in (("capped", cap), ("in_memory", None)):
        tracemalloc.start()
        build_index(values, tmp_path / name, name, memory_limit_bytes=limit)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks["capped"] < 2 * cap, peaks
    assert peaks["in_memory"] > 4 * cap, peaks  # the control: without a cap the sort holds everything
    for f in ("index_to_sample.npy", "index_offsets.npy", "index_to_metric.npy"):
        assert np.array_equal(np.load(tmp_path / "capped" / f), np.load(tmp_path / "in_memory" / f))
