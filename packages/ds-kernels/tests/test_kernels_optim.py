"""CPU optimizer kernels against the reference: odd sizes, every grad/out dtype, every ISA path."""

from __future__ import annotations

import copy

import pytest
import torch
from ds_kernels import reference
from ds_kernels.optim import (
    DSCPUAdagrad,
    DSCPUAdam,
    DSCPULion,
    cpu_adagrad_step,
    cpu_adam_step,
    cpu_lion_step,
)

SIZES = [1, 7, 1023, 70001]  # 1023: not a multiple of any SIMD width; 70001 spans both threads' slices
# fp32 results within 1e-6 relative; atol covers values that cancel to near zero (a few ulp of
# operands of size ~0.1-1, where an FMA vs two roundings already differ by 1e-8).
RTOL, ATOL = 1e-6, 1e-7


def _tensors(n: int, grad_dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen).to(grad_dtype)
    exp_avg = torch.randn(n, generator=gen) * 0.1
    exp_avg_sq = torch.rand(n, generator=gen) * 0.01
    return param, grad, exp_avg, exp_avg_sq


def _clone(ts):
    return [t.clone() for t in ts]


def _assert_out(out, out_ref):
    if out is not None:
        # The low-precision copy is the rounding of (almost) the same fp32 value: equal, or one ulp apart
        # where the fp32 results straddle a rounding boundary.
        assert torch.allclose(out.float(), out_ref.float(), rtol=1e-2, atol=0)
        assert (out != out_ref).float().mean() < 0.01


# Every grad dtype and every out dtype appears; the pairs cover the offload shapes actually used.
DTYPE_PAIRS = [
    (torch.float32, None),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, None),
    (torch.float16, torch.bfloat16),
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype,out_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_adam_matches_reference(isa, n, grad_dtype, out_dtype, adamw_mode):
    p, g, m, v = _tensors(n, grad_dtype)
    p2, g2, m2, v2 = _clone((p, g, m, v))
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    out2 = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    kw = dict(step=5, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, adamw_mode=adamw_mode)
    cpu_adam_step(p, g, m, v, param_out_lowp=out, **kw)
    reference.adam_step(p2, g2, m2, v2, param_out_lowp=out2, **kw)
    torch.testing.assert_close(p, p2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(m, m2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(v, v2, rtol=RTOL, atol=ATOL)
    _assert_out(out, out2)
    assert not torch.equal(p, _tensors(n, grad_dtype)[0])  # the update happened


@pytest.mark.parametrize("bias_correction", [True, False])
def test_adam_bias_correction_flag(compiled_isa, bias_correction):
    p, g, m, v = _tensors(513, torch.float32)
    p2, g2, m2, v2 = _clone((p, g, m, v))
    kw = dict(
        step=1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.0, bias_correction=bias_correction
    )
    cpu_adam_step(p, g, m, v, **kw)
    reference.adam_step(p2, g2, m2, v2, **kw)
    torch.testing.assert_close(p, p2, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype,out_dtype", DTYPE_PAIRS[:4])
def test_adagrad_matches_reference(isa, n, grad_dtype, out_dtype):
    p, g, _, v = _tensors(n, grad_dtype)
    p2, g2, v2 = _clone((p, g, v))
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    out2 = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    kw = dict(step=2, lr=1e-2, eps=1e-10, weight_decay=0.01)
    cpu_adagrad_step(p, g, v, param_out_lowp=out, **kw)
    reference.adagrad_step(p2, g2, v2, param_out_lowp=out2, **kw)
    torch.testing.assert_close(p, p2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(v, v2, rtol=RTOL, atol=ATOL)
    _assert_out(out, out2)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("grad_dtype,out_dtype", DTYPE_PAIRS[:4])
def test_lion_matches_reference(isa, n, grad_dtype, out_dtype):
    p, g, m, _ = _tensors(n, grad_dtype)
    p2, g2, m2 = _clone((p, g, m))
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    out2 = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    kw = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
    cpu_lion_step(p, g, m, param_out_lowp=out, **kw)
    reference.lion_step(p2, g2, m2, param_out_lowp=out2, **kw)
    torch.testing.assert_close(p, p2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(m, m2, rtol=RTOL, atol=ATOL)
    _assert_out(out, out2)


def test_dscpuadam_matches_torch_adamw_over_steps(compiled_isa):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    twin.load_state_dict(model.state_dict())
    ours = DSCPUAdam(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.02)
    theirs = torch.optim.AdamW(twin.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.02)
    x, y = torch.randn(64, 17), torch.randn(64, 5)
    for _ in range(20):
        for net, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dscpuadam_l2_mode_matches_torch_adam(compiled_isa):
    torch.manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(300))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = DSCPUAdam([p1], lr=1e-2, weight_decay=0.1, adamw_mode=False)
    theirs = torch.optim.Adam([p2], lr=1e-2, weight_decay=0.1)
    for step in range(10):
        g = torch.randn(300, generator=torch.Generator().manual_seed(step))
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_lowp_params_out_and_state_dict_roundtrip():
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(3, 7))]
    opt = DSCPUAdam([{"params": [params[0]]}, {"params": [params[1]], "lr": 1e-2}])
    outs = [torch.empty(40, dtype=torch.bfloat16), torch.empty(3, 7, dtype=torch.bfloat16)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(lowp_params_out=outs)
    for p, o in zip(params, outs):
        assert torch.equal(o, p.detach().to(torch.bfloat16))
    sd = opt.state_dict()
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"] and sd["state"][1]["step"] == 1
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = DSCPUAdam([{"params": [clone[0]]}, {"params": [clone[1]], "lr": 1e-2}])
    opt2.load_state_dict(copy.deepcopy(sd))  # torch would otherwise share the state tensors
    g = [torch.randn_like(p) for p in params]
    for a, b, gg in zip(params, clone, g):
        a.grad, b.grad = gg.clone(), gg.clone()
    opt.step()
    opt2.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)


def test_adagrad_and_lion_classes_step():
    for cls, keys in ((DSCPUAdagrad, ["exp_avg_sq", "step"]), (DSCPULion, ["exp_avg", "step"])):
        p = torch.nn.Parameter(torch.ones(10))
        opt = cls([p], lr=0.1)
        p.grad = torch.ones(10)
        opt.step()
        assert torch.all(p < 1.0)
        assert sorted(opt.state_dict()["state"][0]) == keys


def test_bad_inputs_give_one_clear_error():
    p, g, m, v = _tensors(10, torch.float32)
    kw = dict(step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="grad: has 9 elements"):
        cpu_adam_step(p, g[:9], m, v, **kw)
    with pytest.raises(TypeError, match="param: dtype float16"):
        cpu_adam_step(p.half(), g, m, v, **kw)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_adam_step(p, torch.randn(20)[::2], m, v, **kw)
    with pytest.raises(TypeError, match="param_out_lowp"):
        cpu_adam_step(p, g, m, v, param_out_lowp=torch.empty(10, dtype=torch.float32), **kw)
    with pytest.raises(ValueError, match="step must be >= 1"):
        cpu_adam_step(p, g, m, v, **{**kw, "step": 0})
    with pytest.raises(ValueError, match="betas"):
        DSCPUAdam([torch.nn.Parameter(p)], betas=(1.0, 0.9))
    before = p.clone()
    with pytest.raises(ValueError):
        cpu_adam_step(p, g, m[:5], v, **kw)
    assert torch.equal(p, before)  # nothing was touched
    q = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    q.grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp32 CPU tensor"):
        DSCPUAdam([q]).step()
    with pytest.raises(ValueError, match="lowp_params_out has 1 tensors"):
        params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))]
        for t in params:
            t.grad = torch.randn(3)
        DSCPUAdam(params).step(lowp_params_out=[torch.empty(3, dtype=torch.bfloat16)])


@pytest.mark.parametrize("n", [7, 1023, 70001])
@pytest.mark.parametrize("grad_dtype,out_dtype", [(torch.float32, None), (torch.bfloat16, torch.bfloat16)])
def test_adam_bf16_states_match_reference(isa, n, grad_dtype, out_dtype):
    p, g, m, v = _tensors(n, grad_dtype)
    m, v = m.to(torch.bfloat16), v.to(torch.bfloat16)
    p2, g2, m2, v2 = _clone((p, g, m, v))
    out = None if out_dtype is None else torch.empty(n, dtype=out_dtype)
    kw = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    cpu_adam_step(p, g, m, v, param_out_lowp=out, **kw)
    reference.adam_step(p2, g2, m2, v2, **kw)
    assert m.dtype == torch.bfloat16 and v.dtype == torch.bfloat16
    torch.testing.assert_close(p, p2, rtol=RTOL, atol=ATOL)
    # States are the bf16 rounding of (nearly) the same fp32 value: equal or one bf16 ulp apart.
    torch.testing.assert_close(m.float(), m2.float(), rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(v.float(), v2.float(), rtol=1e-2, atol=1e-9)
    assert (m != m2).float().mean() < 0.01


def test_dscpuadam_bf16_states_keep_their_dtype_across_state_dict():
    p = torch.nn.Parameter(torch.randn(50))
    opt = DSCPUAdam([p], state_dtype=torch.bfloat16)
    p.grad = torch.randn(50)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = DSCPUAdam([q], state_dtype=torch.bfloat16)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.state[q]["exp_avg_sq"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="state_dtype"):
        DSCPUAdam([q], state_dtype=torch.float16)


def test_mixed_state_dtypes_are_rejected():
    p, g, m, v = _tensors(10, torch.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        cpu_adam_step(
            p, g, m.bfloat16(), v, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0
        )
