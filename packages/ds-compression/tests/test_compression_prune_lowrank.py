import pytest
import torch
from ds_compression import (
    CompressionInputError,
    LowRankLinear,
    low_rank,
    prune_channels,
    prune_heads,
    prune_magnitude,
    prune_n_m,
    sparsity,
)
from ds_compression.model_utils import count_parameters
from ds_compression.testing import assert_unchanged, state_snapshot


def test_magnitude_pruning_zeroes_the_smallest_half(llama):
    snap = state_snapshot(llama)
    p = prune_magnitude(llama, sparsity_ratio=0.5)
    assert_unchanged(llama, snap)
    assert abs(sparsity(p) - 0.5) < 0.01
    w0, w1 = llama.model.layers[0].mlp.up_proj.weight, p.model.layers[0].mlp.up_proj.weight
    kept, dropped = w0[w1 != 0].abs(), w0[w1 == 0].abs()
    assert kept.min() >= dropped.max()


def test_two_four_keeps_two_of_every_four(llama):
    p = prune_n_m(llama, n=2, m=4)
    w = p.model.layers[1].self_attn.q_proj.weight
    nonzero_per_group = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
    assert (nonzero_per_group <= 2).all()
    assert abs(sparsity(p) - 0.5) < 0.01


def test_channel_pruning_makes_a_smaller_model_that_runs(llama, token_ids):
    p = prune_channels(llama, ratio=0.25)
    mlp = p.model.layers[0].mlp
    assert mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features == 96
    assert p.config.intermediate_size == 96 and llama.config.intermediate_size == 128
    assert count_parameters(p) < count_parameters(llama)
    assert p(token_ids).logits.shape == llama(token_ids).logits.shape


def test_channel_pruning_of_dead_channels_is_exact(llama, token_ids):
    # zero the down-projection columns of 32 channels: pruning exactly those must not change outputs
    with torch.no_grad():
        for layer in llama.model.layers:
            layer.mlp.down_proj.weight[:, :32] = 0
    p = prune_channels(llama, ratio=0.25)
    torch.testing.assert_close(p(token_ids).logits, llama(token_ids).logits, atol=1e-5, rtol=1e-5)


def test_head_pruning_gqa_removes_whole_kv_groups(llama, token_ids):
    p = prune_heads(llama, ratio=0.5)
    attn = p.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
    assert attn.o_proj.in_features == 32
    assert torch.isfinite(p(token_ids).logits).all()


def test_head_pruning_bert_exact_when_pruned_heads_are_dead(bert):
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # heads 1 and 3 contribute nothing: their output-projection columns are 0
        for layer in bert.encoder.layer:
            w = layer.attention.output.dense.weight
            w[:, 16:32] = 0
            w[:, 48:64] = 0
    p = prune_heads(bert, ratio=0.5)
    sa = p.encoder.layer[0].attention.self
    assert sa.num_attention_heads == 2 and sa.query.out_features == 32
    torch.testing.assert_close(p(ids).last_hidden_state, bert(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_low_rank_full_rank_is_exact_and_reports_savings():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    lr = LowRankLinear.from_linear(lin, rank=32)
    x = torch.randn(4, 32)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-4, rtol=1e-4)


def test_low_rank_model_saves_parameters(llama, token_ids):
    snap = state_snapshot(llama)
    p = low_rank(llama, rank=8)
    assert_unchanged(llama, snap)
    entry = p.ds_compression_history[-1]
    assert entry["params_after"] < entry["params_before"] and entry["param_savings"] > 0
    assert isinstance(p.model.layers[0].mlp.up_proj, LowRankLinear)
    assert p(token_ids).logits.shape == (2, 16, 256)


@pytest.mark.parametrize("fn,kw,msg", [
    (prune_magnitude, dict(sparsity_ratio=1.5), "sparsity"),
    (prune_n_m, dict(n=4, m=4), "0 < n < m"),
    (prune_channels, dict(ratio=0.0), "ratio"),
    (prune_heads, dict(ratio=1.0), "ratio"),
    (low_rank, dict(rank=60), "would not reduce"),
    (low_rank, dict(rank=4, rank_ratio=0.1), "exactly one"),
])
def test_bad_pruning_arguments_are_rejected(llama, fn, kw, msg):
    snap = state_snapshot(llama)
    with pytest.raises(CompressionInputError, match=msg):
        fn(llama, **kw)
    assert_unchanged(llama, snap)


def test_structured_pruning_rejects_unknown_layouts():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(CompressionInputError, match="no MLP layout"):
        prune_channels(model, ratio=0.5)
    with pytest.raises(CompressionInputError, match="no attention layout"):
        prune_heads(model, ratio=0.5)
