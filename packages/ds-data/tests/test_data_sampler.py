"""Curriculum sampler: window, exactly-once per epoch across ranks, determinism, resume, multi-process."""

import numpy as np
import pytest
import torch
from ds_core.testing import run_distributed
from ds_data.analyzer import MetricIndex, build_index
from ds_data.config import CurriculumMetricConfig, DataEfficiencyConfig
from ds_data.sampler import CurriculumSampler

N = 600


def metric_cfg(lo, hi, steps=20, dtype="value", **over):
    cfg = {
        "index_to_sample_path": "unused",
        "difficulty_type": dtype,
        "min_difficulty": lo,
        "max_difficulty": hi,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": steps, "difficulty_step": 1},
    }
    cfg.update(over)
    return CurriculumMetricConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    build_index(rng.integers(1, 101, size=N).astype(np.int64), root / "len", "len")
    build_index(rng.random(N), root / "rare", "rare")
    return {"len": MetricIndex(root / "len"), "rare": MetricIndex(root / "rare")}


def samplers(indexes, world, lo=10, hi=100, steps=20, micro=3, gas=2, seed=7, metrics=None):
    metrics = metrics or {"len": (indexes["len"], metric_cfg(lo, hi, steps))}
    return [CurriculumSampler(metrics, micro, rank, world, gas, seed=seed) for rank in range(world)]


def draw(sampler, steps):
    """`steps` optimizer steps of one rank: a list of per-step sample-id lists."""
    it = iter(sampler)
    return [sum((next(it) for _ in range(sampler.gradient_accumulation_steps)), []) for _ in range(steps)]


@pytest.mark.parametrize("world", [2, 4])
def test_every_window_sample_drawn_exactly_once_per_epoch(indexes, world):
    """Fixed window (min == max difficulty): one epoch = window size draws, each sample once, ranks disjoint."""
    ss = samplers(indexes, world, lo=60, hi=60, micro=5, gas=1)
    window = np.flatnonzero(indexes["len"].sample_to_metric <= 60)
    global_batch = 5 * world
    steps = len(window) // global_batch
    per_rank = [draw(s, steps) for s in ss]
    for step in range(steps):
        sets = [set(r[step]) for r in per_rank]
        assert sum(len(x) for x in sets) == global_batch == len(set().union(*sets))  # disjoint shares
    drawn = np.concatenate([np.concatenate(r) for r in per_rank])
    assert len(drawn) == len(set(drawn.tolist()))  # nothing twice within the epoch
    assert set(drawn.tolist()) <= set(window.tolist())
    assert len(window) - len(drawn) < global_batch  # all but the last partial batch's worth
    assert ss[0].epoch == 0


def test_growing_window_epochs_cover_the_window_exactly_once(indexes):
    s = samplers(indexes, 1, lo=10, hi=100, steps=30, micro=8, gas=1)[0]
    values = indexes["len"].sample_to_metric
    seen, epoch = [], 0
    for _ in range(400):
        batch = s.next_global_batch()
        if s.epoch != epoch:  # the epoch rolled over inside this batch
            assert len(set(seen)) == len(seen)
            break
        seen.extend(batch.tolist())
        d = s.current_difficulties()["len"]
        assert values[batch].max() <= d  # every drawn sample is inside the current window
        assert len(set(seen)) == len(seen)
    else:
        pytest.fail("no epoch completed")
    # the epoch ended when every sample of the final (full) window had been drawn
    final_window = set(np.flatnonzero(values <= 100).tolist())
    assert set(seen) | set(batch.tolist()) >= final_window
    assert len(set(seen)) <= len(final_window)


def test_deterministic_by_seed_and_seed_matters(indexes):
    a = draw(samplers(indexes, 2, seed=1)[1], 30)
    b = draw(samplers(indexes, 2, seed=1)[1], 30)
    c = draw(samplers(indexes, 2, seed=2)[1], 30)
    assert a == b and a != c


@pytest.mark.parametrize("stop_at", [1, 9, 47])
def test_resume_continues_the_same_sequence(indexes, stop_at):
    reference = draw(samplers(indexes, 2)[1], 80)
    first = samplers(indexes, 2)[1]
    part = draw(first, stop_at)
    state = torch.load(_roundtrip(first.state_dict()), weights_only=False)
    second = samplers(indexes, 2)[1]
    second.load_state_dict(state)
    assert part + draw(second, 80 - stop_at) == reference


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_resume_rejects_a_different_global_batch(indexes):
    s = samplers(indexes, 2)[0]
    draw(s, 3)
    other = samplers(indexes, 4)[0]
    with pytest.raises(ValueError, match="global_batch_size"):
        other.load_state_dict(s.state_dict())


def test_multi_metric_window_is_the_intersection(indexes):
    metrics = {
        "len": (indexes["len"], metric_cfg(50, 50)),
        "rare": (indexes["rare"], metric_cfg(40, 40, dtype="percentile")),
    }
    s = CurriculumSampler(metrics, micro_batch_size=4)
    s.next_global_batch()
    window = s.window(s.current_difficulties())
    easiest_rare = set(
        np.argsort(indexes["rare"].sample_to_metric, kind="stable")[: int(np.ceil(N * 0.4))].tolist()
    )
    expected = set(np.flatnonzero(indexes["len"].sample_to_metric <= 50).tolist()) & easiest_rare
    assert set(np.flatnonzero(window).tolist()) == expected
    drawn = np.concatenate([s.next_global_batch() for _ in range(len(expected) // 4)])
    assert set(drawn.tolist()) <= expected


def test_single_cluster_metric_does_not_filter(indexes):
    metrics = {"len": (indexes["len"], metric_cfg(10, 10, clustering_type="single_cluster"))}
    s = CurriculumSampler(metrics, micro_batch_size=4)
    s.next_global_batch()
    assert s.window(s.current_difficulties()).all()


def test_empty_window_is_an_error(indexes):
    s = CurriculumSampler({"len": (indexes["len"], metric_cfg(0, 0))}, micro_batch_size=2)
    with pytest.raises(RuntimeError, match="window is empty"):
        s.next_global_batch()


def test_from_config_reads_index_paths(indexes):
    cfg = DataEfficiencyConfig.model_validate(
        {
            "enabled": True,
            "seed": 3,
            "data_sampling": {
                "enabled": True,
                "num_epochs": 2,
                "curriculum_learning": {
                    "enabled": True,
                    "curriculum_metrics": {
                        "len": {
                            "index_to_sample_path": str(indexes["len"].path / "index_to_sample.npy"),
                            "index_to_metric_path": str(indexes["len"].path / "index_to_metric.npy"),
                            "difficulty_type": "value",
                            "clustering_type": "schedule_based",
                            "min_difficulty": 100,
                            "max_difficulty": 100,
                            "schedule_type": "fixed_linear",
                            "schedule_config": {"total_curriculum_step": 5, "difficulty_step": 1},
                        }
                    },
                },
            },
        }
    )
    s = CurriculumSampler.from_config(cfg, micro_batch_size=10)
    batches = list(s)  # num_epochs=2 bounds the iteration
    ids = np.concatenate(batches)
    assert len(ids) == 2 * N  # two whole epochs (600 is a multiple of the batch), then the sampler stops
    assert (np.bincount(ids, minlength=N) == 2).all()


def _rank_draws(index_path, steps):
    """Runs on each rank: build the sampler for this rank and all-gather every step's ids."""
    from ds_core import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    metrics = {"len": (MetricIndex(index_path), metric_cfg(10, 100, 20))}
    sampler = CurriculumSampler(metrics, 3, rank, world, 2, seed=7)
    mine = torch.tensor(draw(sampler, steps), dtype=torch.int64)  # [steps, 6]
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    comm.all_gather(gathered, mine)
    return torch.cat(gathered, dim=1).tolist()  # [steps, 6 * world] in rank order


@pytest.mark.parametrize("world", [2, 4])
def test_real_processes_draw_disjoint_shares_equal_to_the_single_process_global_batch(indexes, world):
    steps = 25
    results = run_distributed(_rank_draws, world, str(indexes["len"].path), steps)
    reference = CurriculumSampler({"len": (indexes["len"], metric_cfg(10, 100, 20))}, 3, 0, world, 2, seed=7)
    expected = [reference.next_global_batch().tolist() for _ in range(steps)]
    assert all(r == expected for r in results)
    for row in expected:
        assert len(set(row)) == len(row)


def test_state_holds_only_plain_values_and_tensors(indexes):
    """Checkpoint writers that serialize to JSON (tensors as lists) must be able to carry the state."""
    s = samplers(indexes, 2)[0]
    draw(s, 5)

    def walk(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and walk(x) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return all(walk(x) for x in v)
        return v is None or isinstance(v, (bool, int, float, str, torch.Tensor))

    state = s.state_dict()
    assert walk(state)
    as_lists = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    as_lists["segment_start_drawn"] = torch.tensor(as_lists["segment_start_drawn"], dtype=torch.uint8)
    resumed = samplers(indexes, 2)[0]
    resumed.load_state_dict(as_lists)
    assert draw(resumed, 4) == draw(s, 4)
