import pytest
import torch
from ds_compression import CompressionInputError, QuantLinear, quantize
from ds_compression.quant.functional import quantize_activation_tokenwise, ternary_weight
from ds_compression.testing import assert_unchanged, make_llama, state_snapshot


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kw,tol", [
    (dict(weight_bits=8), 0.02),
    (dict(weight_bits=8, act_bits=8), 0.03),
    (dict(weight_bits=4, group_size=32), 0.2),
    (dict(weight_bits=4, group_size=16, symmetric=False), 0.2),
])
def test_quantized_model_tracks_fp32_and_leaves_input_untouched(llama, token_ids, kw, tol):
    snap = state_snapshot(llama)
    ref = llama(token_ids).logits
    q = quantize(llama, show_progress=False, **kw)
    assert_unchanged(llama, snap)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7  # q,k,v,o,gate,up,down per block; lm_head excluded by default
    assert all(m.weight_bits == kw["weight_bits"] for m in layers)
    assert _rel_err(q(token_ids).logits, ref) < tol


def test_int4_is_smaller_than_int8_smaller_than_fp32(llama):
    from ds_compression.model_utils import model_bytes

    b32 = model_bytes(llama)
    b8 = model_bytes(quantize(llama, weight_bits=8, show_progress=False))
    b4 = model_bytes(quantize(llama, weight_bits=4, group_size=64, show_progress=False))
    assert b4 < b8 < b32


def test_quantlinear_matches_dequantized_matmul():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = QuantLinear.from_linear(lin, weight_bits=4, group_size=16)
    x = torch.randn(3, 5, 64)
    expect = x @ q.dequantized_weight().t() + lin.bias
    torch.testing.assert_close(q(x), expect, atol=1e-4, rtol=1e-4)
    assert (q.int_weight().abs() <= 7).all()


def test_tokenwise_activation_quant_has_one_scale_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 50.0, -25.0]])
    q = quantize_activation_tokenwise(x, 8)
    # each row keeps its own range: the small row's error is bounded by its own half step,
    # not by the large row's (which would be 0.39 and wipe out 0.25)
    for row, qrow in zip(x, q):
        half_step = row.abs().max() / 127 / 2
        assert (qrow - row).abs().max() <= half_step + 1e-6
    assert q[0, 2] != 0


def test_ternary_weight_has_three_levels_per_row():
    w = torch.randn(8, 64)
    t = ternary_weight(w)
    for row in t:
        assert len(torch.unique(row.abs())) <= 2  # {0, alpha}


@pytest.mark.parametrize("kw,msg", [
    (dict(weight_bits=3), "bits must be one of"),
    (dict(weight_bits=8, act_bits=2), "bits must be one of"),
    (dict(weight_bits=4, group_size=48), "does not divide"),
    (dict(weight_bits=8, modules=["model.embed_tokens"]), "Embedding"),
    (dict(weight_bits=8, modules=["nothing_here"]), "no torch.nn.Linear"),
    (dict(weight_bits=8, lkd=True), "calibration"),
    (dict(method="gptq"), "unknown quantization method"),
])
def test_bad_input_gives_one_clear_error_and_no_change(llama, kw, msg):
    snap = state_snapshot(llama)
    with pytest.raises((CompressionInputError, ValueError), match=msg):
        quantize(llama, show_progress=False, **kw)
    assert_unchanged(llama, snap)


def test_lkd_reduces_block_error_over_round_to_nearest(token_ids):
    model = make_llama(layers=2)
    torch.manual_seed(3)
    batches = [torch.randint(0, 256, (2, 16)) for _ in range(4)]
    q = quantize(model, weight_bits=4, group_size=16, lkd=True, calib_batches=batches, lkd_steps=40,
                 lkd_lr=1e-4, show_progress=False)
    entry = q.ds_compression_history[-1]
    assert entry["lkd"] is True
    before, after = entry["lkd_block_mse_before"], entry["lkd_block_mse_after"]
    assert len(before) == 2
    assert sum(after) < 0.9 * sum(before)
    rtn = quantize(model, weight_bits=4, group_size=16, show_progress=False)
    ref = model(token_ids).logits
    assert _rel_err(q(token_ids).logits, ref) < _rel_err(rtn(token_ids).logits, ref)
    assert all(isinstance(m, QuantLinear) for n, m in q.named_modules() if n.endswith("proj"))


def test_glob_and_regex_module_patterns_select_layers(llama):
    only_down = quantize(llama, weight_bits=8, modules=["*down_proj"], show_progress=False)
    kinds = {n: type(m).__name__ for n, m in only_down.named_modules() if n.endswith("proj")}
    assert kinds["model.layers.0.mlp.down_proj"] == "QuantLinear"
    assert kinds["model.layers.0.mlp.up_proj"] == "Linear"
    by_regex = quantize(llama, weight_bits=8, modules=[r"layers\.1\..*q_proj"], show_progress=False)
    assert isinstance(by_regex.model.layers[1].self_attn.q_proj, QuantLinear)
    assert not isinstance(by_regex.model.layers[0].self_attn.q_proj, QuantLinear)
