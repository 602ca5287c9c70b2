"""ds_train.hf.Trainer: a transformers Trainer user switches the import and trains on the engine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ds_core.testing import run_distributed

transformers = pytest.importorskip("transformers")

from ds_train.hf import Trainer, fill_auto_from_training_args  # noqa: E402


def _model(dropout: float = 0.1) -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg)


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        # a learnable pattern: every sequence counts upwards from a random start
        starts = torch.randint(0, 48, (64,), generator=g)
        self.ids = starts[:, None] + torch.arange(16)[None, :]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(tmp_path: Path, **kw) -> transformers.TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3,
                warmup_steps=2, logging_steps=3, save_steps=6, report_to=[], use_cpu=True, seed=1)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_auto_values_are_filled_from_training_args(tmp_path: Path) -> None:
    args = _args(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=True)
    cfg = fill_auto_from_training_args(
        {"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
         "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
         "zero_optimization": {"stage": 1}}, args, total_steps=100)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is True
    assert cfg["optimizer"]["params"]["lr"] == 5e-3
    assert cfg["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 5e-3, "warmup_num_steps": 2, "warmup_type": "linear",
        "total_num_steps": 100}}
    assert cfg["zero_optimization"] == {"stage": 1}


def test_trainer_trains_logs_checkpoints_and_saves(tmp_path: Path) -> None:
    trainer = Trainer(model=_model(), args=_args(tmp_path), train_dataset=_Data(),
                      ds_config={"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}})
    out = trainer.train()
    assert out.global_step == 12
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[-1] < lrs[0]  # linear decay towards 0
    assert (tmp_path / "out" / "checkpoint-6" / "latest").read_text() == "global_step6"
    trainer.save_model()
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(reloaded.transformer.wte.weight, trainer.engine.module.transformer.wte.weight)


def test_unsupported_training_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch_compile"):
        Trainer(model=_model(), args=_args(tmp_path, torch_compile=True), train_dataset=_Data())


def _train_losses(out_dir: str, micro: int, steps: int = 8) -> dict:
    """ZeRO-2 fp32 Trainer run; the logged losses, the final weights and the step count."""
    args = transformers.TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=micro, learning_rate=5e-3,
        warmup_steps=2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=1)
    # no dropout: its masks depend on how the batch is split, the reference comparison needs the same forward
    trainer = Trainer(model=_model(dropout=0.0), args=args, train_dataset=_Data(),
                      ds_config={"zero_optimization": {"stage": 2}})
    out = trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "steps": out.global_step,
            "train_loss": out.training_loss, "world": trainer.engine.dp_world_size,
            "params": {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}}


def test_trainer_on_2_processes_matches_one_process(tmp_path: Path) -> None:
    # the same global batch of 4: 2 ranks x 2 samples vs 1 process x 4 samples, the same sample order
    ranks = run_distributed(_train_losses, 2, str(tmp_path / "two"), 2)
    ref = _train_losses(str(tmp_path / "one"), 4)
    assert [r["world"] for r in ranks] == [2, 2] and ref["world"] == 1
    for rank, got in enumerate(ranks):
        assert got["steps"] == ref["steps"] == 8
        # the logged loss is the global batch's (as transformers logs it), on every rank; fp32 tolerances of
        # the engine's reference tests (1e-5 relative for losses, 2e-5 for parameters)
        assert len(got["losses"]) == len(ref["losses"]) == 8
        for step, (g, w) in enumerate(zip(got["losses"], ref["losses"])):
            assert abs(g - w) <= 1e-5 * max(1.0, abs(w)), f"rank {rank} step {step}: {g} vs {w}"
        assert abs(got["train_loss"] - ref["train_loss"]) <= 1e-5 * max(1.0, ref["train_loss"])
        worst = max((got["params"][n] - ref["params"][n]).abs().max().item() for n in ref["params"])
        assert worst <= 2e-5, f"rank {rank}: max |param - reference| = {worst:.3e}"
    assert ref["losses"][-1] < ref["losses"][0] - 0.3  # it trained: the comparison is not vacuous
