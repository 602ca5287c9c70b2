"""transformers at ZeRO-3 on ds_train, after the engine exists: `generate()` and `Trainer.save_model()`.

generate: each forward of a stage-3 model is a collective, so ranks that finish early must keep
stepping (transformers' `synced_gpus`, on by default only when it sees ZeRO-3). Inside
`zero3_for_transformers(engine)` ranks asking for different lengths finish, and each rank's tokens equal a
plain single-process greedy `generate` exactly.

save_model: at stage 3 a rank holds only pieces; the saved `save_pretrained` folder must hold the
whole trained weights (equal to the engine's gathered weights, and within 2e-5 of the 1-process run),
whether the Trainer got the model whole or already partitioned (loaded under `zero.Init`).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.zero.stage3_testing import hf_model, stage3_config

transformers = pytest.importorskip("transformers")

_PROMPT = [3, 5, 7, 9]
_NEW_TOKENS = (3, 7)  # per rank: rank 0 is done long before rank 1


def _generate_worker(path: str) -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.hf import zero3_for_transformers
    from ds_train.zero import Init

    transformers.logging.set_verbosity_error()
    rank = comm.get_rank()
    cfg = stage3_config("fp32", 2)
    with Init(config=cfg):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    engine.module.eval()
    new = _NEW_TOKENS[rank]
    with zero3_for_transformers(engine):
        out = engine.module.generate(input_ids=torch.tensor([_PROMPT]) + rank, max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False)
    partitioned = all(p.numel() == 0 for p in model.parameters())
    engine.destroy()
    return {"tokens": out, "partitioned": partitioned}


def test_generate_at_stage3_with_different_lengths_per_rank_matches_plain_greedy(tmp_path: Path) -> None:
    torch.manual_seed(3)
    hf_model("llama").model.save_pretrained(str(tmp_path))
    results = run_distributed(_generate_worker, 2, str(tmp_path))
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    for rank, res in enumerate(results):
        new = _NEW_TOKENS[rank]
        want = plain.generate(input_ids=torch.tensor([_PROMPT]) + rank, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
        assert res["tokens"].shape == (1, len(_PROMPT) + new) and res["partitioned"]
        assert torch.equal(res["tokens"], want), rank


# -- Trainer.save_model at stage 3 ---------------------------------------------------------------------
def _model() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


class _Data(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict:
        ids = (torch.arange(16) + 3 * i) % 64
        return {"input_ids": ids, "labels": ids}


def _trainer_worker(out_dir: str, micro: int, stage: int, built_from: str | None = None) -> dict:
    from ds_train.hf import Trainer
    from ds_train.zero import Init

    args = transformers.TrainingArguments(output_dir=out_dir, max_steps=4, per_device_train_batch_size=micro,
                                          learning_rate=5e-3, save_strategy="no", report_to=[], use_cpu=True, seed=1)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter partitioned, none kept whole
    if built_from is None:
        model = _model()
    else:  # the DeepSpeed recipe: loaded already partitioned, then handed to the Trainer
        with Init(config={"train_micro_batch_size_per_gpu": micro, "zero_optimization": zero}):
            model = transformers.GPT2LMHeadModel.from_pretrained(built_from)
    trainer = Trainer(model=model, args=args, train_dataset=_Data(), ds_config={"zero_optimization": zero})
    trainer.train()
    trainer.save_model()
    return {"params": trainer.engine.get_fp32_state_dict(), "world": trainer.engine.dp_world_size}


@pytest.mark.parametrize("under_init", [False, True])
def test_trainer_save_model_at_stage3_writes_the_whole_trained_weights(tmp_path: Path, under_init: bool) -> None:
    built_from = None
    if under_init:
        built_from = str(tmp_path / "start")
        _model().save_pretrained(built_from)
    ranks = run_distributed(_trainer_worker, 2, str(tmp_path / "two"), 2, 3, built_from)
    ref = _trainer_worker(str(tmp_path / "one"), 4, 2)
    assert [r["world"] for r in ranks] == [2, 2]
    saved = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "two"))
    got = dict(saved.named_parameters())
    assert set(got) == set(ranks[0]["params"])
    for name, t in ranks[0]["params"].items():
        assert got[name].shape == t.shape and torch.equal(got[name].detach(), t), name
        assert (t - ref["params"][name]).abs().max().item() < 2e-5, name
