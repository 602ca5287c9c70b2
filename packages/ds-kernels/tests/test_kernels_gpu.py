"""CUDA ops against the torch references (need a GPU and the built _cuda_ops library)."""

from __future__ import annotations

import pytest
import torch
from ds_kernels import cuda, reference
from ds_kernels.quant import dequantize, quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not cuda.available(), reason="needs a GPU and ds_kernels/_cuda_ops.so (tools/gpu_check.sh)"
    ),
]


def _dev():
    from ds_core.accelerator import get_accelerator

    return get_accelerator().device()


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_multi_tensor_adam_matches_reference(grad_dtype, adamw_mode):
    sizes = [1, 7, 4095, 4097, 300_001] + [33] * 30  # more tensors and blocks than one launch holds
    gen = torch.Generator().manual_seed(0)
    host = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(4)]
    host[3] = [t.abs() * 0.01 for t in host[3]]
    host[1] = [t.to(grad_dtype) for t in host[1]]
    dev = [[t.to(_dev()) for t in group] for group in host]
    kw = dict(step=4, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, adamw_mode=adamw_mode)
    cuda.multi_tensor_adam(*dev, **kw)
    for p, g, m, v in zip(*host):
        reference.adam_step(p, g, m, v, **kw)
    for group_dev, group_host in zip(dev, host):
        for d, h in zip(group_dev, group_host):
            torch.testing.assert_close(d.cpu().float(), h.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dequantize_match_cpu(bits, symmetric, dtype):
    x = (torch.randn(12, 512) * 2).to(dtype)
    qt_gpu = quantize(x.to(_dev()), bits, 128, symmetric)
    q, s, z = reference.quantize_groups(x, bits, 128, symmetric)
    assert (qt_gpu.unpacked().cpu().int() - q.int()).abs().max() <= 1  # ties may round either way
    torch.testing.assert_close(qt_gpu.scale.cpu(), s)
    out = dequantize(qt_gpu)
    assert out.device.type != "cpu" and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), x.float(), atol=float(s.max()) * 0.51 + 1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_matches_reference(dtype, approximate):
    x = torch.randn(33, 257, dtype=dtype, device=_dev())
    b = torch.randn(257, dtype=dtype, device=_dev())
    out = cuda.bias_gelu(x, b, approximate)
    expect = reference.bias_gelu(x, b, approximate)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expect.float(), rtol=tol, atol=tol)
