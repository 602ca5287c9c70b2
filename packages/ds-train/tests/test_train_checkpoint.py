"""Checkpoints: exact resume, resharding 4 -> 2 -> 1, crash safety, corrupt files, fp32 consolidation."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ds_train
import pytest
import torch
from ds_core import comm
from ds_core.testing import run_distributed
from ds_train.checkpoint import CheckpointError, CheckpointReader, get_fp32_state_dict_from_zero_checkpoint
from ds_train.checkpoint.zero_to_fp32 import main as zero_to_fp32_main
from ds_train.testing import VOCAB, engine_config, lm_loss, make_model


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 8) -> None:
        self.data = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _engine(stage: int, dtype: str, ga: int, seed: int = 0):
    cfg = engine_config(stage, dtype, ga, comm.get_world_size() if comm.is_initialized() else 1)
    cfg["scheduler"] = {"type": "WarmupDecayLR",
                        "params": {"warmup_num_steps": 3, "total_num_steps": 12, "warmup_max_lr": 1e-2}}
    engine, _, loader, _ = ds_train.initialize(model=make_model(seed), config=cfg, training_data=_Tokens())
    return engine, loader


def _run(engine, loader, steps: int) -> list[float]:
    losses = []
    it = iter(loader)
    for _ in range(steps * engine.gradient_accumulation_steps()):
        try:
            ids = next(it)
        except StopIteration:
            it = iter(loader)
            ids = next(it)
        loss = lm_loss(engine(ids), ids)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def _resume_cases(cases: list[tuple], root: str) -> dict:
    out = {}
    for stage, dtype, ga in cases:
        straight, loader = _engine(stage, dtype, ga)
        full = _run(straight, loader, 10)
        want = straight.get_fp32_state_dict()
        first, loader = _engine(stage, dtype, ga)
        part1 = _run(first, loader, 5)
        path = os.path.join(root, f"s{stage}{dtype}{ga}")
        first.save_checkpoint(path, client_state={"note": "half way", "epoch": 0})
        resumed, loader = _engine(stage, dtype, ga, seed=123)  # different init: everything must come from disk
        _, client = resumed.load_checkpoint(path)
        part2 = _run(resumed, loader, 5)
        got = resumed.get_fp32_state_dict()
        out[(stage, dtype, ga)] = {
            "full": full, "resumed": part1 + part2, "client": client, "steps": resumed.global_steps,
            "lr": (straight.get_lr(), resumed.get_lr()), "scale": (straight.cur_scale, resumed.cur_scale),
            "max_param_diff": max((got[n] - want[n]).abs().max().item() for n in want),
        }
    return out


RESUME_CASES = [(0, "fp32", 2), (1, "fp16", 1), (2, "bf16", 2), (2, "fp32", 1)]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> list[dict]:
    return run_distributed(_resume_cases, 2, RESUME_CASES, str(tmp_path_factory.mktemp("resume")))


@pytest.mark.parametrize("case", RESUME_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ten_steps_equal_five_save_load_five(resumed: list[dict], case: tuple) -> None:
    for rank, res in enumerate(resumed):
        r = res[case]
        assert r["client"] == {"note": "half way", "epoch": 0}
        assert r["steps"] == 10
        assert r["lr"][0] == r["lr"][1]
        assert r["scale"][0] == r["scale"][1]
        # same ranks, same data position, same optimizer/scheduler/scaler state: the same numbers
        assert r["resumed"] == pytest.approx(r["full"], abs=1e-6), f"rank {rank}"
        assert r["max_param_diff"] <= 1e-6


def _save_after_training(root: str) -> None:
    engine, loader = _engine(2, "fp32", 1)
    _run(engine, loader, 3)
    engine.save_checkpoint(os.path.join(root, "w4"), tag="t")


def _reload_and_resave(root: str, src: str, dst: str, stage: int) -> None:
    engine, _ = _engine(stage, "fp32", 1, seed=99)
    engine.load_checkpoint(os.path.join(root, src), tag="t")
    engine.save_checkpoint(os.path.join(root, dst), tag="t")


def _states(path: Path) -> dict:
    reader = CheckpointReader(str(path), "t")
    out = {}
    for g in range(reader.group_count()):
        for key in reader.state_keys(g):
            for name, t in reader.full_tensors(g, key).items():
                out[(key, name)] = t
    return out


def test_checkpoint_reshards_4_to_2_to_1(tmp_path: Path) -> None:
    root = str(tmp_path)
    run_distributed(_save_after_training, 4, root)
    run_distributed(_reload_and_resave, 2, root, "w4", "w2", 1)  # stage 2 -> stage 1 as well
    _reload_and_resave(root, "w2", "w1", 0)  # and one process, stage 0
    w4, w2, w1 = (_states(tmp_path / d) for d in ("w4", "w2", "w1"))
    assert CheckpointReader(root + "/w4", "t").shards == 4
    assert CheckpointReader(root + "/w2", "t").shards == 2
    assert {k[0] for k in w4} == {"fp32", "exp_avg", "exp_avg_sq"}
    assert set(w4) == set(w2) == set(w1)
    for key in w4:
        assert torch.equal(w4[key], w2[key]), key
        assert torch.equal(w4[key], w1[key]), key
    meta = [CheckpointReader(root + f"/{d}", "t").group_meta(0)["scalar_state"] for d in ("w4", "w2", "w1")]
    assert meta[0]["step"] == meta[1]["step"] == meta[2]["step"] == 3


def _single_engine(tmp: Path, steps: int = 2):
    engine, loader = _engine(1, "fp32", 1)
    _run(engine, loader, steps)
    return engine, loader


_CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import importlib.util
    spec = importlib.util.spec_from_file_location("ckpt_tests", {this!r})
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    import ds_train.checkpoint.writer as writer
    engine, loader = mod._engine(1, "fp32", 1)
    mod._run(engine, loader, 2)
    engine.save_checkpoint({root!r})                      # global_step2: complete
    mod._run(engine, loader, 1)
    def killed(*args, **kwargs):
        os._exit(9)                                       # die after the files are written, before the rename
    writer.os.replace = killed
    engine.save_checkpoint({root!r})                      # global_step3: interrupted
""")


def test_killed_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    script = _CRASH_SCRIPT.format(tests=str(Path(__file__).parent), this=__file__, root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert (root / "latest").read_text() == "global_step2"
    assert (root / ".tmp-global_step3").is_dir() and not (root / "global_step3").exists()
    engine, _ = _engine(1, "fp32", 1, seed=5)
    path, _ = engine.load_checkpoint(str(root))
    assert path.endswith("global_step2") and engine.global_steps == 2
    engine.save_checkpoint(str(root))  # a later save cleans the leftovers of the dead one
    assert (root / "latest").read_text() == "global_step2"
    assert not (root / ".tmp-global_step2").exists()


@pytest.fixture()
def saved(tmp_path: Path):
    engine, _ = _single_engine(tmp_path)
    engine.save_checkpoint(str(tmp_path / "ck"), tag="t")
    return engine, tmp_path / "ck"


def test_corrupt_shard_is_a_clear_error_and_changes_nothing(saved) -> None:
    engine, root = saved
    shard = root / "t" / "zero_pp_rank_0_mp_rank_00_optim_states.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    other, _ = _engine(1, "fp32", 1, seed=42)
    before = {n: p.detach().clone() for n, p in other.module.named_parameters()}
    with pytest.raises(CheckpointError, match="CRC32 mismatch"):
        other.load_checkpoint(str(root), tag="t")
    assert all(torch.equal(before[n], p) for n, p in other.module.named_parameters())


def test_missing_and_truncated_files_are_clear_errors(saved) -> None:
    engine, root = saved
    (root / "t" / "zero_pp_rank_0_mp_rank_00_optim_states.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        engine.load_checkpoint(str(root), tag="t")
    (root / "t" / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        engine.load_checkpoint(str(root), tag="t")
    with pytest.raises(CheckpointError, match="not found"):
        engine.load_checkpoint(str(root), tag="nope")


def test_checkpoint_of_another_model_is_rejected(saved) -> None:
    _, root = saved
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    cfg = engine_config(1, "fp32", 1, 1)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    with pytest.raises(CheckpointError, match="does not match"):
        engine.load_checkpoint(str(root), tag="t")


def test_no_latest_returns_none_like_deepspeed(tmp_path: Path) -> None:
    engine, _ = _engine(1, "fp32", 1)
    assert engine.load_checkpoint(str(tmp_path / "empty")) == (None, None)


def test_client_state_must_be_json(saved, tmp_path: Path) -> None:
    engine, _ = saved
    with pytest.raises(CheckpointError, match="JSON"):
        engine.save_checkpoint(str(tmp_path / "x"), client_state={"obj": object()})
    assert not (tmp_path / "x").exists()


def test_zero_to_fp32_matches_the_live_master_weights(saved, tmp_path: Path) -> None:
    engine, root = saved
    live = engine.get_fp32_state_dict()
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(root))
    for name, t in live.items():
        assert torch.equal(consolidated[name], t), name
    # tied weights appear under both names; buffers come along
    assert torch.equal(consolidated["head.weight"], consolidated["embed.weight"])
    assert "scale" in consolidated
    out = tmp_path / "fp32.safetensors"
    assert zero_to_fp32_main([str(root), str(out)]) == 0
    from safetensors.torch import load_file

    loaded = load_file(str(out))
    assert torch.equal(loaded["up.weight"], live["up.weight"])
    model = make_model(3)
    missing = model.load_state_dict({**loaded, "head.weight": loaded["embed.weight"]}, strict=True)
    assert not missing.missing_keys
    out_pt = tmp_path / "fp32.bin"
    assert zero_to_fp32_main([str(root), str(out_pt)]) == 0
    assert torch.equal(torch.load(out_pt, weights_only=True)["down.bias"], live["down.bias"])
    assert zero_to_fp32_main([str(tmp_path / "nothing"), str(out)]) == 2


def test_load_module_only_restores_weights_but_not_the_training_state(saved) -> None:
    engine, root = saved
    fresh, _ = _engine(2, "fp32", 1, seed=11)  # another stage: the module state is stage-independent
    fresh.load_checkpoint(str(root), tag="t", load_module_only=True)
    assert fresh.global_steps == 0
    live, loaded = engine.get_fp32_state_dict(), fresh.get_fp32_state_dict()
    assert all(torch.equal(live[n], loaded[n]) for n in live)
    # optimizer untouched: its moments are still the zeros created at initialize, not the saved ones
    moments = [t for st in fresh.optimizer.state.values() for k, t in st.items() if k != "step"]
    assert moments and all(torch.count_nonzero(t) == 0 for t in moments)
