"""Group-wise INT8/INT4 quantization and the fused dequantize+matmul against the reference."""

from __future__ import annotations

import pytest
import torch
from ds_kernels import reference
from ds_kernels.quant import QuantizedTensor, dequantize, quantize, quantized_matmul

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _x(shape, dtype, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,group", [((7, 2), 2), ((3, 5, 96), 32), ((1, 1023 * 2), 1023 * 2)])
def test_quantize_matches_reference(isa, bits, symmetric, dtype, shape, group):
    x = _x(shape, dtype)
    qt = quantize(x, bits, group, symmetric)
    q_ref, s_ref, z_ref = reference.quantize_groups(x, bits, group, symmetric)
    assert qt.data.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert qt.data.shape[-1] == (shape[-1] // 2 if bits == 4 else shape[-1])
    assert torch.equal(qt.unpacked(), q_ref)
    assert torch.equal(qt.scale, s_ref)
    assert (qt.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(qt.zero_point, z_ref)
    out = dequantize(qt)
    assert out.dtype == dtype and out.shape == x.shape
    expect = reference.dequantize_groups(q_ref, s_ref, z_ref, group).to(dtype)
    assert torch.equal(out, expect)
    # Error bound of the format itself: half a step per element.
    step = s_ref.repeat_interleave(group).reshape(shape)
    assert torch.all((out.float() - x.float()).abs() <= step * 0.5 + 1e-2 * x.float().abs() + 1e-6)


def test_int4_packing_layout():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = reference.pack_int4(q)
    assert packed.tolist() == [[(1 & 0xF) | ((-2 & 0xF) << 4), 7 | ((-8 & 0xF) << 4)]]
    assert torch.equal(reference.unpack_int4(packed), q)


def test_zero_group_and_constant_group():
    x = torch.zeros(2, 8)
    x[1] = 5.0
    for sym in (True, False):
        out = dequantize(quantize(x, 8, 8, sym))
        torch.testing.assert_close(out, x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_quantized_matmul_matches_reference(isa, bits, symmetric, rows, x_dtype):
    w = _x((37, 192), torch.float32, seed=1)
    qt = quantize(w, bits, 64, symmetric)
    x = _x((rows, 192), x_dtype, seed=2)
    bias = torch.randn(37)
    out = quantized_matmul(x, qt, bias)
    expect = reference.quantized_matmul(x, qt.unpacked(), qt.scale, qt.zero_point, 64, bias)
    assert out.dtype == x_dtype and out.shape == (rows, 37)
    tol = 1e-4 if x_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expect, rtol=tol, atol=tol * 10)


def test_quantized_matmul_batched_leading_dims(compiled_isa):
    qt = quantize(_x((16, 64), torch.float32), 8, 32)
    x = _x((2, 3, 64), torch.float32, seed=3)
    out = quantized_matmul(x, qt)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, x @ dequantize(qt).t(), rtol=1e-4, atol=1e-4)


def test_bad_inputs_give_one_clear_error():
    x = torch.randn(4, 30)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize(x, 3, 10)
    with pytest.raises(ValueError, match="group_size 7 must be positive and divide the last dim"):
        quantize(x, 8, 7)
    with pytest.raises(ValueError, match="group_size must be even"):
        quantize(torch.randn(4, 9), 4, 3)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        quantize(torch.ones(4, 8, dtype=torch.int32), 8, 4)
    qt = quantize(x, 8, 10)
    with pytest.raises(ValueError, match="last dim 31"):
        quantized_matmul(torch.randn(2, 31), qt)
    with pytest.raises(ValueError, match="bias must have shape"):
        quantized_matmul(torch.randn(2, 30), qt, bias=torch.zeros(3))
    broken = QuantizedTensor(qt.data[:2], qt.scale, None, 8, 10, qt.shape, qt.dtype)
    with pytest.raises(ValueError, match="data has 60 elements"):
        dequantize(broken)
