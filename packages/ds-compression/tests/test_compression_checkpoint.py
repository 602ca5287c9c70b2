import json

import pytest
import torch
from ds_compression import (
    CompressionInputError,
    QuantLinear,
    load_compressed,
    low_rank,
    prune_channels,
    prune_heads,
    quantize,
    save_compressed,
)


@pytest.mark.parametrize("make", [
    lambda m: quantize(m, weight_bits=4, group_size=32, act_bits=8, show_progress=False),
    lambda m: quantize(m, weight_bits=8, symmetric=False, show_progress=False),
    lambda m: quantize(m, method="xtc", weight_bits=1, show_progress=False),
    lambda m: quantize(prune_heads(prune_channels(m, ratio=0.5), ratio=0.5), weight_bits=4, group_size=16,
                       show_progress=False),
    lambda m: low_rank(m, rank=8),
], ids=["w4a8", "w8-asym", "binary", "pruned+w4", "lowrank"])
def test_saved_directory_reloads_to_identical_outputs(llama, token_ids, tmp_path, make):
    q = make(llama)
    expect = q(token_ids).logits
    out = save_compressed(q, tmp_path / "c")
    scheme = json.loads((out / "compression_config.json").read_text())
    assert scheme["history"] and scheme["modules"]
    r = load_compressed(out)
    torch.testing.assert_close(r(token_ids).logits, expect, atol=0, rtol=0)
    assert r.lm_head.weight is r.model.embed_tokens.weight  # tie survives the round trip


def test_quantized_checkpoint_is_smaller(llama, tmp_path):
    full = save_compressed(llama, tmp_path / "fp32")
    q4 = save_compressed(quantize(llama, weight_bits=4, group_size=64, show_progress=False), tmp_path / "q4")
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(q4) < 0.6 * size(full)
    qt = load_compressed(q4).model.layers[0].mlp.up_proj
    assert isinstance(qt, QuantLinear) and qt.qweight.dtype == torch.uint8  # packed int4


def test_save_refuses_non_empty_dir_and_keeps_it(llama, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CompressionInputError, match="not empty"):
        save_compressed(llama, target)
    assert (target / "keep.txt").read_text() == "mine"
    save_compressed(llama, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_load_rejects_missing_and_corrupt_directories(tmp_path, llama):
    with pytest.raises(CompressionInputError, match="not a compressed model directory"):
        load_compressed(tmp_path)
    out = save_compressed(llama, tmp_path / "m")
    (out / "compression_config.json").write_text("{broken")
    with pytest.raises(CompressionInputError, match="not valid JSON"):
        load_compressed(out)
