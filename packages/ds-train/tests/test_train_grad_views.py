"""Stages 0/1: each parameter's .grad is its view of the engine's gradient buffer, so autograd accumulates
in place. After a boundary backward, p.grad is the gradient averaged over ranks and micro steps when the
buckets are all-reduced (stage 0, stage 1 with reduce_scatter=false; fp32: within 1e-6 of a
single-process computation), no new gradient tensor was allocated, and a .grad the user replaced or
dropped mid-accumulation is folded back into the buffer. A stage-1 reduce-scatter (the default) reduces
only this rank's piece of p.grad, as in DeepSpeed."""
from __future__ import annotations

import ds_train
import torch
from ds_core import comm
from ds_core.testing import run_distributed
from ds_train.testing import engine_config, lm_loss, make_batch, make_model

GA = 2


def _reference_grads(world: int) -> dict[str, torch.Tensor]:
    model = make_model()
    for micro in range(GA):
        for rank in range(world):
            ids = make_batch(0, micro, rank)
            (lm_loss(model(ids), ids) / (world * GA)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _run(stage: int, drop_grad: bool, reduce_scatter: bool | None = None) -> dict:
    rank, world = comm.get_rank(), comm.get_world_size()
    cfg = engine_config(stage, "fp32", GA, world)
    if reduce_scatter is not None:
        cfg["zero_optimization"]["reduce_scatter"] = reduce_scatter
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg)
    views = {n: p.grad for n, p in engine.module.named_parameters()}
    for micro in range(GA):
        ids = make_batch(0, micro, rank)
        engine.backward(lm_loss(engine(ids), ids))
        if drop_grad and micro == 0:
            engine.module.embed.weight.grad = None  # e.g. a user's zero_grad(set_to_none=True) mid-way
        if micro == GA - 1:
            grads = {n: p.grad.clone() for n, p in engine.module.named_parameters()}
            same = all(p.grad is views[n] for n, p in engine.module.named_parameters())
        engine.step()
    after = {n: float(p.grad.abs().max()) for n, p in engine.module.named_parameters()}
    engine.destroy()
    return {"grads": grads, "same_tensors": same, "max_after_step": max(after.values())}


def test_grads_are_views_of_the_reduced_buffer() -> None:
    ref = _reference_grads(2)
    for stage, reduce_scatter in ((0, None), (1, False), (1, None)):
        for rank, res in enumerate(run_distributed(_run, 2, stage, False, reduce_scatter)):
            case = f"stage {stage} reduce_scatter={reduce_scatter} rank {rank}"
            assert res["same_tensors"], f"{case}: p.grad is not the buffer view any more"
            if stage == 0 or reduce_scatter is False:  # all-reduced: p.grad itself is the average
                for n, g in res["grads"].items():
                    assert torch.allclose(g, ref[n], atol=1e-6, rtol=0), f"{case}: p.grad {n}"
            assert res["max_after_step"] == 0.0, "gradients must be zero after the step"


def test_dropped_grad_is_folded_back() -> None:
    """The first micro step's embedding gradient is dropped by the user: the buffer keeps it (it was
    accumulated in place), the second micro step's arrives in a fresh tensor and is added."""
    ref = _reference_grads(2)
    for res in run_distributed(_run, 2, 0, True):
        assert res["same_tensors"]
        assert torch.allclose(res["grads"]["embed.weight"], ref["embed.weight"], atol=1e-6, rtol=0)
