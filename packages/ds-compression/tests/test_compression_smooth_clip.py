"""SmoothQuant folding, asymmetric token-wise activations, clipping search and learned LKD ranges."""
import copy

import pytest
import torch
from ds_compression import CompressionInputError, QuantLinear, load_compressed, quantize, save_compressed
from ds_compression.quant.clipping import fake_quantize_ranges, search_clip_ranges
from ds_compression.quant.functional import quantize_activation_tokenwise
from ds_compression.smoothquant import smooth_activations
from ds_compression.testing import make_bert, make_llama


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _calib(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 16), generator=g) for _ in range(n)]


def _llama_with_outlier_channels():
    """Real LLMs have a few input channels far larger than the rest; plant them in the norms."""
    m = make_llama(layers=2)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 40.0
    return m


@torch.no_grad()
def test_smoothing_folds_exactly_and_moves_the_outliers(token_ids):
    m = _llama_with_outlier_channels()
    ref = m(token_ids).logits
    s = copy.deepcopy(m)
    names = smooth_activations(s, _calib(), alpha=0.5)
    assert len(names) == 2 * 7
    assert _rel_err(s(token_ids).logits, ref) < 1e-5  # same function in floating point
    n0, n1 = m.model.layers[0].input_layernorm.weight, s.model.layers[0].input_layernorm.weight
    assert n1[3].abs() / n1.abs().median() < 0.2 * n0[3].abs() / n0.abs().median()  # outlier flattened


@torch.no_grad()
def test_smoothquant_option_lowers_w8a8_error_and_reloads_exactly(token_ids, tmp_path):
    m = _llama_with_outlier_channels()
    ref = m(token_ids).logits
    plain = quantize(m, weight_bits=8, act_bits=8, show_progress=False)
    smooth = quantize(m, weight_bits=8, act_bits=8, smooth_alpha=0.5, calib_batches=_calib(), show_progress=False)
    assert _rel_err(smooth(token_ids).logits, ref) < 0.6 * _rel_err(plain(token_ids).logits, ref)
    entry = smooth.ds_compression_history[-1]
    assert entry["smooth_alpha"] == 0.5 and entry["smoothed_layers"] == 14
    save_compressed(smooth, tmp_path / "sq")
    again = load_compressed(tmp_path / "sq")
    assert torch.equal(again(token_ids).logits, smooth(token_ids).logits)
    assert again.ds_compression_history[-1]["smooth_alpha"] == 0.5


def test_asymmetric_activation_option_is_used_and_saved(tmp_path, token_ids):
    x = torch.rand(3, 64) + 2.0  # one-signed (post-activation-like) inputs
    err_sym = (quantize_activation_tokenwise(x, 8, True) - x).abs().max()
    err_asym = (quantize_activation_tokenwise(x, 8, False) - x).abs().max()
    assert err_asym < 0.7 * err_sym
    m = make_llama()
    q = quantize(m, weight_bits=8, act_bits=8, act_symmetric=False, show_progress=False)
    assert all(not ql.act_symmetric for ql in q.modules() if isinstance(ql, QuantLinear))
    sym = quantize(m, weight_bits=8, act_bits=8, show_progress=False)
    with torch.no_grad():
        assert not torch.equal(q(token_ids).logits, sym(token_ids).logits)
        save_compressed(q, tmp_path / "a")
        again = load_compressed(tmp_path / "a")
        assert torch.equal(again(token_ids).logits, q(token_ids).logits)
    assert all(not ql.act_symmetric for ql in again.modules() if isinstance(ql, QuantLinear))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_than_min_max_and_usually_better(symmetric):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * torch.rand(32, 128) ** 3  # heavy-tailed, like trained weights
    s1, z1 = search_clip_ranges(w, 4, 32, symmetric, grid=1)  # ratio 1.0: min/max
    s, z = search_clip_ranges(w, 4, 32, symmetric)
    e1 = ((fake_quantize_ranges(w, s1, z1, 4, 32) - w) ** 2).reshape(-1, 32).sum(1)
    e = ((fake_quantize_ranges(w, s, z, 4, 32) - w) ** 2).reshape(-1, 32).sum(1)
    assert (e <= e1 + 1e-9).all() and e.sum() < 0.98 * e1.sum()
    lin = torch.nn.Linear(128, 32, bias=False)
    lin.weight.data.copy_(w)
    ql = QuantLinear.from_linear(lin, weight_bits=4, group_size=32, symmetric=symmetric, ranges=(s, z))
    assert torch.allclose(ql.dequantized_weight(), fake_quantize_ranges(w, s, z, 4, 32), atol=1e-6)


def test_clip_search_option_lowers_int4_error_and_reloads(token_ids, tmp_path):
    m = make_llama()
    ref = m(token_ids).logits
    rtn = quantize(m, weight_bits=4, group_size=16, show_progress=False)
    clip = quantize(m, weight_bits=4, group_size=16, clip_search=True, calib_batches=_calib(), show_progress=False)
    with torch.no_grad():
        assert _rel_err(clip(token_ids).logits, ref) < _rel_err(rtn(token_ids).logits, ref)
        l0, r0 = clip.model.layers[0].mlp.down_proj, rtn.model.layers[0].mlp.down_proj
        assert (l0.scales < r0.scales - 1e-9).any()  # some groups were clipped
        save_compressed(clip, tmp_path / "c")
        assert torch.equal(load_compressed(tmp_path / "c")(token_ids).logits, clip(token_ids).logits)
    assert clip.ds_compression_history[-1]["clip_search"] is True


def test_lkd_with_learned_ranges_trains_the_scales():
    m = make_llama(layers=2)
    batches = _calib()
    kw = dict(weight_bits=4, group_size=16, lkd=True, calib_batches=batches, lkd_steps=40, lkd_lr=1e-4,
              clip_search=True, show_progress=False)
    fixed = quantize(m, **kw)
    learned = quantize(m, **kw, lkd_learn_ranges=True)
    init = quantize(m, weight_bits=4, group_size=16, clip_search=True, calib_batches=batches, show_progress=False)
    a, b = learned.model.layers[1].self_attn.q_proj.scales, init.model.layers[1].self_attn.q_proj.scales
    assert not torch.allclose(a, b, rtol=1e-3)  # the ranges moved
    assert torch.allclose(fixed.model.layers[1].self_attn.q_proj.scales, b, rtol=1e-5)  # without the option they do not
    e = learned.ds_compression_history[-1]
    assert e["lkd_learn_ranges"] is True
    assert sum(e["lkd_block_mse_after"]) < 0.9 * sum(e["lkd_block_mse_before"])


@pytest.mark.parametrize("kw,msg", [
    (dict(weight_bits=8, smooth_alpha=0.5, calib_batches=[torch.zeros(1, 4, dtype=torch.long)]), "needs act_bits"),
    (dict(weight_bits=8, act_bits=8, smooth_alpha=0.5), "calibration"),
    (dict(weight_bits=8, act_bits=8, smooth_alpha=1.5, calib_batches=[torch.zeros(1, 4, dtype=torch.long)]), r"\[0, 1\]"),
    (dict(weight_bits=8, act_symmetric=False), "needs act_bits"),
    (dict(weight_bits=4, group_size=16, lkd_learn_ranges=True), "needs lkd"),
])
def test_new_options_reject_bad_combinations(llama, kw, msg):
    with pytest.raises(CompressionInputError, match=msg):
        quantize(llama, show_progress=False, **kw)


def test_smoothquant_on_unknown_layout_names_what_is_missing():
    bert = make_bert()
    batches = [torch.randint(0, 100, (1, 8))]
    with pytest.raises(CompressionInputError, match="Llama-style"):
        quantize(bert, weight_bits=8, act_bits=8, smooth_alpha=0.5, calib_batches=batches, exclude=(), show_progress=False)
