"""ds_train.initialize(training_data=...) with a data_efficiency curriculum over an analyzed metric.

The engine's loader must then be ds-data's curriculum loader: each batch holds only samples inside the
current difficulty window, and a checkpoint restores the sampler so the sample sequence continues.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ds_train
import numpy as np
import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import VOCAB, engine_config, lm_loss, make_model

pytest.importorskip("ds_data.integration")

from ds_data.analyzer import DataAnalyzer, Metric  # noqa: E402 - after the skip

NUM_SAMPLES, SEQ, LEVELS = 300, 8, 8
MIN_LEVEL, MAX_LEVEL, CURRICULUM_STEPS = 1, 7, 6


class LevelDataset(torch.utils.data.Dataset):
    """Random token rows whose first token is the sample's difficulty level (i % LEVELS)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.rows = torch.randint(LEVELS, VOCAB, (NUM_SAMPLES, SEQ), generator=g)
        self.rows[:, 0] = torch.arange(NUM_SAMPLES) % LEVELS

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rows[i]


def _first_token(sample: Any) -> int:
    return int(np.asarray(sample)[0])


def _config(index_dir: Path, grad_accum: int = 2) -> dict[str, Any]:
    metric = {
        "index_to_sample_path": str(index_dir),
        "index_to_metric_path": str(index_dir),
        "difficulty_type": "value",
        "clustering_type": "schedule_based",
        "min_difficulty": MIN_LEVEL,
        "max_difficulty": MAX_LEVEL,
        "schedule_type": "fixed_linear",
        "schedule_config": {"total_curriculum_step": CURRICULUM_STEPS, "difficulty_step": 1},
    }
    cfg = engine_config(0, "fp32", grad_accum, 1)
    cfg["data_efficiency"] = {
        "enabled": True,
        "seed": 1234,
        "data_sampling": {"enabled": True, "num_epochs": 5, "num_workers": 0,
                          "curriculum_learning": {"enabled": True, "curriculum_metrics": {"level": metric}}},
    }
    return cfg


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("analysis")
    DataAnalyzer(LevelDataset(), [Metric("level", _first_token, np.int64)], save_path=out, num_workers=1).run()
    return out / "level"


def _train_step(engine: Any, loader_iter: Any, grad_accum: int) -> list[torch.Tensor]:
    batches = []
    for _ in range(grad_accum):
        ids = next(loader_iter)
        batches.append(ids)
        engine.backward(lm_loss(engine(ids), ids))
        engine.step()
    return batches


def test_loader_yields_only_in_window_samples_and_resumes(index_dir: Path, tmp_path: Path) -> None:
    grad_accum = 2
    data = LevelDataset()
    engine, _, loader, _ = ds_train.initialize(model=make_model(), config=_config(index_dir), training_data=data)
    assert engine.data_efficiency.needs_data_sampler
    assert not isinstance(loader, ds_train.dataloader.DSDataLoader)  # ds-data's curriculum loader

    it = iter(loader)
    sampler = engine.data_efficiency.impl.sampler
    levels_per_step = []
    for _step in range(4):
        batches = _train_step(engine, it, grad_accum)
        window = sampler.current_difficulties()["level"]  # the step the sampler just drew
        levels = torch.cat([b[:, 0] for b in batches])
        assert all(b.shape == (3, SEQ) for b in batches)
        assert int(levels.max()) <= window, f"sample of level {int(levels.max())} outside window <= {window}"
        levels_per_step.append(int(levels.max()))
    assert levels_per_step[0] <= MIN_LEVEL + 1  # the curriculum starts easy

    engine.save_checkpoint(str(tmp_path / "ckpt"))
    expected = [b for _ in range(3) for b in _train_step(engine, it, grad_accum)]

    resumed, _, loader2, _ = ds_train.initialize(model=make_model(seed=1), config=_config(index_dir),
                                                 training_data=data)
    path, _ = resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert path is not None and resumed.global_steps == 4
    it2 = iter(loader2)
    got = [b for _ in range(3) for b in _train_step(resumed, it2, grad_accum)]
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def _resume_on_ranks(index_dir: str, ckpt: str, steps: int) -> list[list[list[int]]]:
    """Per optimizer step, this rank's sample rows (as lists) after loading `ckpt`."""
    engine, _, loader, _ = ds_train.initialize(model=make_model(seed=1), config=_config(Path(index_dir), grad_accum=1),
                                               training_data=LevelDataset())
    engine.load_checkpoint(ckpt)
    it = iter(loader)
    return [[row.tolist() for b in _train_step(engine, it, 1) for row in b] for _ in range(steps)]


def test_curriculum_position_survives_a_world_size_change(index_dir: Path, tmp_path: Path) -> None:
    # global batch 6 both times: 1 process x 3 x accumulation 2, then 2 ranks x 3 x accumulation 1
    engine, _, loader, _ = ds_train.initialize(model=make_model(), config=_config(index_dir, grad_accum=2),
                                               training_data=LevelDataset())
    it = iter(loader)
    for _ in range(3):
        _train_step(engine, it, 2)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    expected = [sorted(row.tolist() for b in _train_step(engine, it, 2) for row in b) for _ in range(3)]
    ranks = run_distributed(_resume_on_ranks, 2, str(index_dir), str(tmp_path / "ckpt"), 3)
    for step in range(3):
        # ds-data's sampler draws each global batch, then splits it over the ranks: the union is the same
        assert sorted(ranks[0][step] + ranks[1][step]) == expected[step], f"step {step}"
        assert ranks[0][step] != ranks[1][step]


def test_sampler_state_loaded_before_the_loader_is_applied_when_it_is_built(index_dir: Path,
                                                                             tmp_path: Path) -> None:
    data = LevelDataset()
    engine, _, loader, _ = ds_train.initialize(model=make_model(), config=_config(index_dir), training_data=data)
    it = iter(loader)
    for _ in range(3):
        _train_step(engine, it, 2)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    expected = _train_step(engine, it, 2)

    later, _, no_loader, _ = ds_train.initialize(model=make_model(), config=_config(index_dir))
    assert no_loader is None
    later.load_checkpoint(str(tmp_path / "ckpt"))
    got = _train_step(later, iter(later.deepspeed_io(data)), 2)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_loader_workers_come_from_the_data_sampling_section(index_dir: Path) -> None:
    engine, *_ = ds_train.initialize(model=make_model(), config=_config(index_dir))
    with pytest.raises(ValueError, match="data_efficiency.data_sampling.num_workers"):
        engine.deepspeed_io(LevelDataset(), num_local_io_workers=2)


def test_missing_metric_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no complete metric index"):
        ds_train.initialize(model=make_model(), config=_config(tmp_path / "nowhere"), training_data=LevelDataset())
