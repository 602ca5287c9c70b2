"""Shard maps: every element of every parameter belongs to exactly one rank's shard."""
from __future__ import annotations

import pytest
import torch
from ds_train.zero.partition import GroupLayout, build_layout


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("bucket", [1, 7, 100, 10_000])
def test_pieces_cover_each_parameter_element_once(parts: int, bucket: int) -> None:
    shapes = [(5, 3), (7,), (1,), (4, 4, 2), (13,)]
    layout = build_layout([f"p{i}" for i in range(len(shapes))], shapes, parts, bucket)
    assert layout.numel % parts == 0
    assert all(b.numel % parts == 0 for b in layout.buckets)
    hits = [torch.zeros(s.numel, dtype=torch.int32) for s in layout.slots]
    for rank in range(parts):
        covered = 0
        for piece in layout.pieces(rank):
            hits[piece.param][piece.param_offset : piece.param_offset + piece.length] += 1
            assert 0 <= piece.shard_offset and piece.shard_offset + piece.length <= layout.shard_numel
            covered += piece.length
        assert covered <= layout.shard_numel
    assert all(bool((h == 1).all()) for h in hits)


def test_shard_views_and_param_views_agree() -> None:
    layout = build_layout(["a", "b", "c"], [(3,), (5,), (4,)], 3, 6)
    flat = torch.arange(layout.numel, dtype=torch.float32)
    params = layout.param_views(flat)
    for rank in range(3):
        shard = torch.cat(layout.shard_views(flat, rank))
        for piece in layout.pieces(rank):
            want = params[piece.param].reshape(-1)[piece.param_offset : piece.param_offset + piece.length]
            assert torch.equal(shard[piece.shard_offset : piece.shard_offset + piece.length], want)


def test_layout_json_round_trip() -> None:
    layout = build_layout(["a", "b"], [(3, 2), (9,)], 4, 5)
    again = GroupLayout.from_json(layout.to_json())
    assert again.slots == layout.slots and again.buckets == layout.buckets and again.numel == layout.numel


def test_large_parameter_gets_its_own_bucket() -> None:
    layout = build_layout(["small", "big", "tail"], [(2,), (50,), (3,)], 2, 10)
    assert [(b.first_param, b.last_param) for b in layout.buckets] == [(0, 2), (2, 3)]


_FAKE_PG_SCRIPT = """
import sys
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import ds_train
from ds_train.testing import engine_config, lm_loss, make_batch, make_model

world = int(sys.argv[1])
dist.init_process_group("fake", store=FakeStore(), rank=world - 1, world_size=world)
engine, *_ = ds_train.initialize(model=make_model(), config=engine_config(2, "bf16", 1, world))
ids = make_batch(0, 0, 0)
engine.backward(lm_loss(engine(ids), ids))
engine.step()
layout = engine.strategy.layouts()[0]
psi = sum(p.numel() for p in engine.module.parameters())
assert layout.parts == world and layout.numel >= psi
assert layout.numel - psi <= len(layout.buckets) * (world - 1), "padding is at most world - 1 per bucket"
held = {k: sum(t.numel() for t in v) for k, v in engine.strategy.model_state_tensors().items()}
shard = layout.numel // world
assert held == {"params": layout.numel, "grads": shard, "master": shard, "optimizer": 2 * shard}, held
print("ok", world)
"""


@pytest.mark.parametrize("world", [64, 512])
def test_stage2_plan_at_large_world_sizes_on_the_fake_backend(world: int) -> None:
    """torch's `fake` process group runs no communication: it checks the sharding plan and that every
    collective the engine issues is well-formed at world sizes this machine cannot spawn. It runs in
    its own interpreter because a process can hold only one default process group."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _FAKE_PG_SCRIPT, str(world)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "DS_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 0 and f"ok {world}" in proc.stdout, proc.stderr[-3000:]
