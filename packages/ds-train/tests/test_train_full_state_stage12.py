"""safe_get/set_full_* on parameters trained by a ZeRO stage 0, 1 or 2 engine (2 gloo ranks, GA 2).

For every stage, fp32 and bf16, each gradient reduction (default = reduce-scatter by sends on gloo,
reduce_scatter=true, reduce_scatter=false) and once with offload_optimizer=cpu at stage 2:
- after the boundary backward, safe_get_full_grad is the single-process average gradient (fp32 within
  1e-6; bf16 within 3% of the tensor's largest gradient: bf16 forward/backward and a bf16 reduction),
- safe_get_full_fp32_param equals the engine's get_fp32_state_dict entry (exactly),
- gradients set by safe_set_full_grad read back exactly and drive the step: the fp32 weights and the
  whole exp_avg / exp_avg_sq after it match one single-process torch AdamW step (clipping included)
  from the same weights with those gradients (1e-6 on weights; 1e-5 relative on state),
- optimizer state and fp32 weights set whole read back exactly, on every rank, and a set weight is
  what the next forward uses (compared with a single-process model holding the new weight),
- a missing state key or a wrongly shaped value is one clear error on every rank (no hang),
- the model stays picklable (torch.save) while an engine trains it.
"""

from __future__ import annotations

import io

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import engine_config, lm_loss, make_batch, make_model

GA = 2
WORLD = 2
LR, BETAS, WD, CLIP = 1e-2, (0.9, 0.95), 0.01, 0.5  # engine_config's optimizer and clipping
STATE_KEYS = ("exp_avg", "exp_avg_sq")
# (stage, dtype, reduce_scatter, offload)
CASES = (
    [(0, "fp32", None, False), (0, "bf16", None, False)]
    + [
        (stage, dtype, rs, False)
        for stage in (1, 2)
        for dtype in ("fp32", "bf16")
        for rs in (None, True, False)
    ]
    + [(2, "fp32", None, True)]
)


def _fixed_grads() -> dict[str, torch.Tensor]:
    """Gradients to set, exactly representable in bf16 (so a bf16 gradient buffer holds them as given)."""
    g = torch.Generator().manual_seed(1234)
    return {
        n: (torch.randn(p.shape, generator=g) * 0.01).bfloat16().float()
        for n, p in make_model().named_parameters()
    }


NEW_NORM = torch.arange(24, dtype=torch.float32) / 8  # exact in bf16


def _one_case(stage: int, dtype: str, reduce_scatter: bool | None, offload: bool) -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.zero import (
        safe_get_full_fp32_param,
        safe_get_full_grad,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_grad,
        safe_set_full_optimizer_state,
    )

    rank = comm.get_rank()
    cfg = engine_config(stage, dtype, GA, comm.get_world_size())
    if reduce_scatter is not None:
        cfg["zero_optimization"]["reduce_scatter"] = reduce_scatter
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    model = make_model()
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    params = dict(model.named_parameters())
    out: dict = {"reduce": engine.strategy.reduce}
    buf = io.BytesIO()
    torch.save(model, buf)  # the engine's bookkeeping must not make the model unpicklable
    out["pickled_bytes"] = buf.tell()
    for micro in range(GA):
        ids = make_batch(0, micro, rank)
        engine.backward(lm_loss(engine(ids), ids))
        if micro < GA - 1:
            engine.step()
    out["grad"] = {n: safe_get_full_grad(p) for n, p in params.items()}
    out["fp32"] = {n: safe_get_full_fp32_param(p) for n, p in params.items()}
    out["fp32_state_dict"] = engine.get_fp32_state_dict()
    fixed = _fixed_grads()
    for n, p in params.items():
        safe_set_full_grad(p, fixed[n])
    out["grad_set"] = {n: safe_get_full_grad(p) for n, p in params.items()}
    engine.step()
    out["after_step"] = engine.get_fp32_state_dict()
    out["state"] = {
        n: {k: safe_get_full_optimizer_state(p, k) for k in STATE_KEYS} for n, p in params.items()
    }

    safe_set_full_optimizer_state(params["up.weight"], torch.full((73, 24), 0.25), "exp_avg")
    out["state_set"] = safe_get_full_optimizer_state(params["up.weight"], "exp_avg")
    out["state_set_other"] = safe_get_full_optimizer_state(params["up.weight"], "exp_avg_sq")
    safe_set_full_fp32_param(params["norm.weight"], NEW_NORM)
    out["fp32_set"] = safe_get_full_fp32_param(params["norm.weight"])
    out["model_copy"] = params["norm.weight"].detach().float().clone()
    out["state_dict_after_set"] = engine.get_fp32_state_dict()
    out["logits"] = engine(make_batch(7, 0, 0)).detach().float()
    errors = []
    for bad in (
        lambda: safe_get_full_optimizer_state(params["up.bias"], "momentum_buffer"),
        lambda: safe_set_full_grad(params["up.bias"], torch.zeros(3)),
        lambda: safe_set_full_fp32_param(params["down.weight"], torch.zeros(73, 24)),
    ):
        try:
            bad()
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    engine.destroy()
    return out


def _all_cases(cases: list) -> list[dict]:
    return [_one_case(*case) for case in cases]


@pytest.fixture(scope="module")
def results() -> list[list[dict]]:
    """results[case][rank], every case in one distributed run (each spawn costs seconds)."""
    per_rank = run_distributed(_all_cases, WORLD, CASES)
    return [[per_rank[r][i] for r in range(WORLD)] for i in range(len(CASES))]


def _reference_grads() -> dict[str, torch.Tensor]:
    model = make_model()
    for micro in range(GA):
        for rank in range(WORLD):
            ids = make_batch(0, micro, rank)
            (lm_loss(model(ids), ids) / (WORLD * GA)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference_step(start: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """One torch AdamW step from `start` with `grads` after global-norm clipping (as the engine does)."""
    names = list(grads)
    master = {n: start[n].clone() for n in names}
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
    coef = min(CLIP / (norm + 1e-6), 1.0)
    for n in names:
        master[n].grad = grads[n] * coef
    opt = torch.optim.AdamW([master[n] for n in names], lr=LR, betas=BETAS, weight_decay=WD)
    opt.step()
    return {n: master[n].detach() for n in names}, {n: opt.state[master[n]] for n in names}


def _case(i: int) -> str:
    stage, dtype, rs, offload = CASES[i]
    return f"stage {stage} {dtype} reduce_scatter={rs}" + (" offload" if offload else "")


def test_full_grad_is_the_single_process_average(results) -> None:
    ref = _reference_grads()
    for i, ranks in enumerate(results):
        dtype = CASES[i][1]
        for rank, res in enumerate(ranks):
            for n, g in res["grad"].items():
                assert g.shape == ref[n].shape and g.dtype == torch.float32
                err = (g - ref[n]).abs().max().item()
                bound = 1e-6 if dtype == "fp32" else 0.03 * ref[n].abs().max().item()
                assert err <= bound, f"{_case(i)} rank {rank} ({res['reduce']}): grad {n} off by {err:.3g}"
            assert all(torch.equal(g, ranks[0]["grad"][n]) for n, g in res["grad"].items())


def test_full_fp32_param_is_the_master_weight(results) -> None:
    for i, ranks in enumerate(results):
        for rank, res in enumerate(ranks):
            for n, t in res["fp32"].items():
                assert torch.equal(t, res["fp32_state_dict"][n]), f"{_case(i)} rank {rank}: {n}"


def test_set_grad_drives_the_step_and_state_is_whole(results) -> None:
    fixed = _fixed_grads()
    for i, ranks in enumerate(results):
        master, state = _reference_step(ranks[0]["fp32_state_dict"], fixed)
        for rank, res in enumerate(ranks):
            case = f"{_case(i)} rank {rank}"
            for n, g in res["grad_set"].items():
                assert torch.equal(g, fixed[n]), f"{case}: set gradient {n} does not read back"
            for n, t in master.items():
                err = (res["after_step"][n] - t).abs().max().item()
                assert err < 1e-6, f"{case}: weight {n} after the step off by {err:.3g}"
                for key in STATE_KEYS:
                    got = res["state"][n][key]
                    assert got.shape == t.shape, f"{case}: {key} of {n} is not whole"
                    torch.testing.assert_close(
                        got, state[n][key], rtol=1e-5, atol=1e-9, msg=f"{case}: {key} {n}"
                    )
                    assert torch.equal(got, ranks[0]["state"][n][key]), f"{case}: ranks disagree on {key} {n}"


def test_setters_round_trip_and_the_forward_uses_the_new_weight(results) -> None:
    for i, ranks in enumerate(results):
        dtype = CASES[i][1]
        for rank, res in enumerate(ranks):
            case = f"{_case(i)} rank {rank}"
            assert torch.equal(res["state_set"], torch.full((73, 24), 0.25)), case
            assert torch.equal(res["state_set_other"], res["state"]["up.weight"]["exp_avg_sq"]), case
            assert torch.equal(res["fp32_set"], NEW_NORM), case
            assert torch.equal(res["model_copy"], NEW_NORM), case
            assert torch.equal(res["state_dict_after_set"]["norm.weight"], NEW_NORM), case
            # a single-process model with the engine's weights (the new one included) gives the same logits
            model = make_model()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(res["state_dict_after_set"][n])
            if dtype == "bf16":
                model = model.to(torch.bfloat16)
            expected = model(make_batch(7, 0, 0)).float()
            torch.testing.assert_close(
                res["logits"], expected, rtol=0, atol=1e-5 if dtype == "fp32" else 1e-2, msg=case
            )


def test_bad_key_or_shape_is_one_clear_error_on_every_rank(results) -> None:
    for i, ranks in enumerate(results):
        for res in ranks:
            missing, grad_shape, param_shape = res["errors"]
            assert missing is not None and "momentum_buffer" in missing and "exp_avg" in missing, _case(i)
            assert grad_shape is not None and "(73,)" in grad_shape, _case(i)
            assert param_shape is not None and "(24, 73)" in param_shape, _case(i)


def test_model_stays_picklable(results) -> None:
    assert all(res["pickled_bytes"] > 0 for ranks in results for res in ranks)
