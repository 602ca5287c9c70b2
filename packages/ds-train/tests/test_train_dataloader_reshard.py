"""The data loader's position survives a change of data-parallel world size (saved on 4 ranks, resumed on 2).

The loader continues the epoch's global sample order at the saved global sample count: the samples all
ranks see after the resume are exactly the ones the straight run sees next, and where the world size
divides that count every rank gets exactly the batches of a run started on the new world size.
"""
from __future__ import annotations

import os
from pathlib import Path

import ds_train
import pytest
import torch
from ds_core import comm
from ds_core.testing import run_distributed
from ds_train import dataloader as dl
from ds_train.dataloader import ResumableBatchSampler
from ds_train.testing import VOCAB, engine_config, lm_loss, make_model

N = 60  # 5 optimizer steps of 12 samples per epoch: epochs end on step boundaries on 4 and on 2 ranks
STEPS, SAVE_AT = 10, 3
SEEN: list[int] = []  # sample ids this process's loader handed out, in order (num_workers=0: same process)


class _Tagged(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.data = torch.randint(0, VOCAB, (N, 8), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, self.data[i]


def _collate(items: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    SEEN.extend(i for i, _ in items)
    return torch.stack([row for _, row in items])


def _engine(micro: int, ga: int, seed: int = 0):
    cfg = engine_config(2, "fp32", ga, comm.get_world_size(), train_micro_batch_size_per_gpu=micro)
    cfg["scheduler"] = {"type": "WarmupDecayLR",
                        "params": {"warmup_num_steps": 3, "total_num_steps": 12, "warmup_max_lr": 1e-2}}
    engine, _, loader, _ = ds_train.initialize(model=make_model(seed), config=cfg, training_data=_Tagged(),
                                               collate_fn=_collate)
    return engine, loader


def _train(engine, loader, steps: int) -> tuple[list[list[int]], list[float]]:
    """Per optimizer step: the sample ids this rank used and the mean of its micro-batch losses."""
    seen, losses, it = [], [], iter(loader)
    for _ in range(steps):
        SEEN.clear()
        step_losses = []
        for _ in range(engine.gradient_accumulation_steps()):
            try:
                ids = next(it)
            except StopIteration:
                it = iter(loader)
                ids = next(it)
            loss = lm_loss(engine(ids), ids)
            engine.backward(loss)
            engine.step()
            step_losses.append(float(loss.detach()))
        seen.append(list(SEEN))
        losses.append(sum(step_losses) / len(step_losses))
    return seen, losses


def _straight_and_save(root: str) -> dict:
    engine, loader = _engine(micro=3, ga=1)
    seen, losses = _train(engine, loader, STEPS)
    params = engine.get_fp32_state_dict()
    first, loader = _engine(micro=3, ga=1)
    _train(first, loader, SAVE_AT)
    first.save_checkpoint(os.path.join(root, "w4"), tag="t")
    return {"seen": seen, "losses": losses, "params": params if comm.get_rank() == 0 else None}


def _resume(root: str, micro: int, ga: int) -> dict:
    engine, loader = _engine(micro, ga, seed=123)  # different init: everything must come from disk
    engine.load_checkpoint(os.path.join(root, "w4"), tag="t")
    seen, losses = _train(engine, loader, STEPS - SAVE_AT)
    params = engine.get_fp32_state_dict()
    return {"seen": seen, "losses": losses, "params": params if comm.get_rank() == 0 else None}


def _union(results: list[dict], step: int) -> list[int]:
    return sorted(i for r in results for i in r["seen"][step])


def test_resume_on_2_ranks_continues_the_4_rank_run_at_its_global_sample_count(tmp_path: Path) -> None:
    straight = run_distributed(_straight_and_save, 4, str(tmp_path))
    # the same global batch (12) on 2 ranks: micro 3 x gradient accumulation 2
    resumed = run_distributed(_resume, 2, str(tmp_path), 3, 2)
    for step in range(STEPS - SAVE_AT):
        want = _union(straight, SAVE_AT + step)
        assert len(want) == 12
        assert _union(resumed, step) == want, f"step {SAVE_AT + step + 1}: other samples than the straight run"
        # the same samples in every optimizer step: the same averaged loss and update (fp32 tolerance of
        # the engine's reference tests, 1e-5 for losses and 2e-5 for parameters)
        want_loss = sum(r["losses"][SAVE_AT + step] for r in straight) / 4
        got_loss = sum(r["losses"][step] for r in resumed) / 2
        assert abs(got_loss - want_loss) <= 1e-5 * max(1.0, abs(want_loss)), (step, got_loss, want_loss)
    want_params, got_params = straight[0]["params"], resumed[0]["params"]
    worst = max((got_params[n] - want_params[n]).abs().max().item() for n in want_params)
    assert worst <= 2e-5
    moved = max((want_params[n] - make_model().state_dict()[n]).abs().max().item() for n in want_params)
    assert moved > 100 * 2e-5  # the comparison is not vacuous


def _order(epoch: int, seed: int = 0, n: int = N) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def _samplers(world: int, batch: int, n: int = N) -> list[ResumableBatchSampler]:
    return [ResumableBatchSampler(n, batch, rank, world) for rank in range(world)]


def _take(sampler: ResumableBatchSampler, batches: int) -> list[list[int]]:
    out = []
    for b in sampler:
        if len(out) == batches:
            break
        out.append(b)
        sampler.position += 1  # what DSDataLoader counts for each batch handed to the caller
    return out


def test_every_rank_gets_the_batches_of_a_run_started_on_the_new_world_size() -> None:
    old = _samplers(4, 3)
    for s in old:
        _take(s, 2)
    state = old[0].state_dict()
    assert state["consumed_samples"] == 24
    new, straight = _samplers(2, 3), _samplers(2, 3)
    for s, ref in zip(new, straight):
        s.load_state_dict(state)
        _take(ref, 24 // (3 * 2))  # a 2-rank run that consumed the same 24 samples
        assert list(s) == list(ref)  # both iterate from their own position on


def test_a_world_size_not_dividing_the_count_still_continues_the_global_order(monkeypatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(dl.logger, "warning", warnings.append)
    old = _samplers(4, 3)
    for s in old:
        _take(s, 1)
    new = _samplers(8, 2)  # 12 samples consumed, 8 ranks: the rank a sample lands on differs
    for s in new:
        s.load_state_dict(old[0].state_dict())
    assert len(warnings) == 8 and "not a multiple of 8" in warnings[0]
    rest = [i for s in new for b in s for i in b]
    assert sorted(rest) == sorted(_order(0)[12:])  # 48 samples: no padding needed, none skipped or repeated
    assert all(len(list(s)) == len(list(new[0])) for s in new)


def test_resume_at_the_end_of_an_epoch_starts_the_next_one() -> None:
    old = _samplers(4, 3, n=62)  # 16 per rank (padded), the last batch of each rank holds 1 sample
    for s in old:
        _take(s, 6)
    state = old[0].state_dict()
    assert state["consumed_samples"] == 62
    new = _samplers(2, 3, n=62)
    new[0].load_state_dict(state)
    assert (new[0].epoch, new[0].consumed_samples) == (1, 0)
    assert next(iter(new[0])) == _order(1, n=62)[0:6:2]


def test_a_checkpoint_of_another_dataset_is_rejected() -> None:
    state = _samplers(4, 3)[0].state_dict()
    with pytest.raises(ValueError, match="dataset of 60 samples"):
        ResumableBatchSampler(61, 3).load_state_dict(state)


def test_a_position_off_the_new_global_batch_is_warned_about(tmp_path: Path, monkeypatch) -> None:
    from ds_train import engine as engine_mod

    warnings: list[str] = []
    monkeypatch.setattr(engine_mod.logger, "warning", warnings.append)
    cfg = engine_config(0, "fp32", 1, 1)
    engine, _, loader, _ = ds_train.initialize(model=make_model(), config=cfg, training_data=_Tagged(),
                                               collate_fn=_collate)
    ids = next(iter(loader))
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    engine.save_checkpoint(str(tmp_path), tag="t")  # 3 samples consumed
    cfg5 = engine_config(0, "fp32", 1, 1, train_micro_batch_size_per_gpu=5)
    other, _, loader5, _ = ds_train.initialize(model=make_model(), config=cfg5, training_data=_Tagged(),
                                               collate_fn=_collate)
    other.load_checkpoint(str(tmp_path), tag="t")
    assert any("train_batch_size=5" in w for w in warnings), warnings
    SEEN.clear()
    next(iter(loader5))
    assert SEEN == _order(0)[3:8]  # the order continues after the 3 samples the first run took
