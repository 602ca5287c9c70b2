"""Parameters without a gradient in a backward count as zero gradients (ignore_unused_parameters, the
default) at every stage 0-2, including when the stage-2 staging buffers are reused from an earlier step
in which those parameters did get gradients (the buffers are not zeroed wholesale: only unwritten slots
and padding are). Two heads used on alternating steps, 2 gloo ranks on the same batch, against a
single-process AdamW whose missing gradients are zeros: losses 1e-6 relative, weights 2e-6."""
from __future__ import annotations

import ds_train
import pytest
import torch
from ds_core import comm
from ds_core.testing import run_distributed

STEPS = 6


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, 16)
        self.head_a = torch.nn.Linear(16, 32)
        self.head_b = torch.nn.Linear(16, 32)

    def forward(self, ids: torch.Tensor, use_b: bool) -> torch.Tensor:
        head = self.head_b if use_b else self.head_a
        return torch.nn.functional.cross_entropy(head(self.embed(ids)), ids)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, 32, (4,), generator=torch.Generator().manual_seed(step))


def _config(stage: int, bucket: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket}}


def _train(stage: int, bucket: int) -> dict:
    engine, *_ = ds_train.initialize(model=TwoHeads(), config=_config(stage, bucket))
    losses = []
    for step in range(STEPS):
        loss = engine(_batch(step), use_b=step % 2 == 1)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    params = engine.get_fp32_state_dict()
    engine.destroy()
    return {"losses": losses, "params": params if comm.get_rank() == 0 else None}


def _reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = TwoHeads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for p in model.parameters():  # zeros, not None: an unused head still takes an Adam step
        p.grad = torch.zeros_like(p)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=False)
        loss = model(_batch(step), use_b=step % 2 == 1)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage,bucket", [(0, 300), (1, 300), (2, 300), (2, 10_000)])
def test_unused_parameters_count_as_zero(stage: int, bucket: int) -> None:
    ref_losses, ref_params = _reference()
    res = run_distributed(_train, 2, stage, bucket)
    for r in res:
        assert r["losses"] == pytest.approx(ref_losses, rel=1e-6)
    for name, want in ref_params.items():
        got = res[0]["params"][name]
        assert torch.allclose(got, want, atol=2e-6, rtol=0), f"stage {stage} {name}: {(got - want).abs().max()}"
