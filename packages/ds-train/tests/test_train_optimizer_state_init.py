"""Optimizer state is created at initialize (as DeepSpeed does), with exactly the values torch's lazy
first-step initialization would give, so training is unchanged."""
from __future__ import annotations

import ds_train
import pytest
import torch
from ds_train.optim import materialize_state
from ds_train.testing import engine_config, lm_loss, make_batch, make_model


@pytest.mark.parametrize("cls,kwargs", [(torch.optim.AdamW, {"fused": True}), (torch.optim.Adam, {"amsgrad": True}),
                                        (torch.optim.AdamW, {})])
def test_materialized_state_trains_exactly_like_lazy_state(cls, kwargs) -> None:
    torch.manual_seed(0)
    lazy_params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in lazy_params]
    lazy, eager = cls(lazy_params, lr=0.1, **kwargs), cls(eager_params, lr=0.1, **kwargs)
    materialize_state(eager)
    assert all(torch.count_nonzero(eager.state[p]["exp_avg_sq"]) == 0 for p in eager_params)
    assert ("max_exp_avg_sq" in eager.state[eager_params[0]]) == bool(kwargs.get("amsgrad"))
    for step in range(3):
        for params, opt in ((lazy_params, lazy), (eager_params, eager)):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (i + 1))
            opt.step()
    for a, b in zip(lazy_params, eager_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(lazy_params, eager_params, strict=True):
        for key, value in lazy.state[a].items():
            assert torch.equal(value, eager.state[b][key]), key
            assert value.dtype == eager.state[b][key].dtype and value.device == eager.state[b][key].device, key


def test_other_optimizers_are_left_lazy() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    materialize_state(sgd)
    assert not sgd.state


@pytest.mark.parametrize("stage,offload", [(0, False), (2, False), (2, True), (3, False)])
def test_engine_has_optimizer_state_before_the_first_step(stage: int, offload: bool) -> None:
    cfg = engine_config(stage, "bf16", 1, 1)
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, *_ = ds_train.initialize(model=make_model(), config=cfg, dist_init_required=False)
    opt = engine.strategy.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    assert params and all(opt.state[p].get("exp_avg") is not None for p in params)
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in params)
    ids = make_batch(0, 0, 0)
    engine.backward(lm_loss(engine(ids), ids))
    engine.step()
    assert any(torch.count_nonzero(opt.state[p]["exp_avg"]) for p in params)
    engine.destroy()
