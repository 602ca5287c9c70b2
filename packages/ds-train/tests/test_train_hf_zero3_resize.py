"""transformers' ZeRO-3 code paths on ds_train's partitioning: `resize_token_embeddings` under zero.Init.

The user code is the DeepSpeed recipe: load the model under `zero.Init`, add tokens, resize, train at
stage 3. Inside `ds_train.hf.zero3_for_transformers(model)` transformers takes its ZeRO-3 branch (it
gathers the embeddings to read and copy them). The gathered result must equal the same resize on a plain
single-process model: the existing rows exactly, the new rows within 1e-6 (the same seed draws the same
rows; mean-resizing's covariance is a matmul whose summation order may differ by thread count), every
other parameter exactly; ranks agree (rank 0's draw), tying survives, and each rank keeps only its piece.
Then a stage-3 engine trains it like the plain resized model (losses 1e-5, weights 2e-5, as the other
zero.Init tests).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import VOCAB, reference_train, train_steps
from ds_train.zero.stage3_testing import hf_model, stage3_config

NEW_ROWS_TOL = 1e-6


def _save(kind: str, path: str) -> None:
    torch.manual_seed(3)
    hf_model(kind).model.save_pretrained(path)


def _plain_resized(path: str, resize: dict) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(11)
    model.resize_token_embeddings(**resize)
    model.config.use_cache = False
    return model


def _resize_train_worker(path: str, resize: dict, steps: int) -> dict:
    import ds_train
    import transformers
    from ds_core import comm
    from ds_train.hf import zero3_for_transformers
    from ds_train.zero import GatheredParameters, Init
    from ds_train.zero.stage3_testing import _HFLogits

    transformers.logging.set_verbosity_error()
    rank = comm.get_rank()
    cfg = stage3_config("fp32", 2)
    with Init(config=cfg):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.config.use_cache = False
    torch.manual_seed(11)
    with zero3_for_transformers(model):
        model.resize_token_embeddings(**resize)
    out = {
        "deepspeed_gone": "deepspeed" not in sys.modules,
        "switch_off": not transformers.integrations.deepspeed.is_deepspeed_zero3_enabled(),
        "all_partitioned": all(hasattr(p, "ds3") and p.numel() == 0 for p in model.parameters()),
        "shards": {n: (p.ds3.init_shard.numel(), p.ds3.numel) for n, p in model.named_parameters()},
        "tied": model.get_input_embeddings().weight is model.get_output_embeddings().weight,
        "vocab": (model.config.vocab_size, model.get_input_embeddings().num_embeddings),
    }
    with GatheredParameters(list(model.parameters())):
        out["state"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = _HFLogits(model)
    wrapped.train()
    engine, *_ = ds_train.initialize(model=wrapped, config=cfg)
    losses = train_steps(engine, steps, rank)
    out["losses"] = losses
    out["final"] = engine.get_fp32_state_dict()
    engine.destroy()
    return out


_EMBEDDINGS = {"gpt2": ("transformer.wte.weight",), "llama": ("model.embed_tokens.weight", "lm_head.weight")}


@pytest.mark.parametrize("kind,resize", [
    ("gpt2", {"new_num_tokens": VOCAB + 8}),  # tied head, mean-resizing (transformers' default)
    ("llama", {"new_num_tokens": VOCAB + 5, "pad_to_multiple_of": 16, "mean_resizing": False}),  # untied, init rule
])
def test_resize_token_embeddings_under_zero_init_matches_plain_and_trains_like_it(tmp_path, kind, resize) -> None:
    path = str(tmp_path)
    _save(kind, path)
    steps = 5
    results = run_distributed(_resize_train_worker, 2, path, resize, steps)
    plain = _plain_resized(path, resize)
    want = dict(plain.named_parameters())
    new_vocab = plain.get_input_embeddings().weight.shape[0]
    assert new_vocab > VOCAB and plain.config.vocab_size == new_vocab
    for res in results:
        assert res["deepspeed_gone"] and res["switch_off"] and res["all_partitioned"]
        assert res["tied"] is (kind == "gpt2")
        assert res["vocab"] == (new_vocab, new_vocab)
        assert set(res["state"]) == set(want)
        for name, t in want.items():
            got = res["state"][name]
            assert got.shape == t.shape, name
            assert res["shards"][name] == (-(-t.numel() // 2), t.numel()), name  # half each, padded
            if name in _EMBEDDINGS[kind]:
                assert torch.equal(got[:VOCAB], t[:VOCAB].detach()), name  # existing rows: exact
                assert (got[VOCAB:] - t[VOCAB:]).abs().max().item() < NEW_ROWS_TOL, name
                assert got[VOCAB:].abs().sum() > 0, name  # really initialized
            else:
                assert torch.equal(got, t.detach()), name
    for name in _EMBEDDINGS[kind]:  # the ranks hold one model: rank 0's new rows
        assert torch.equal(results[0]["state"][name], results[1]["state"][name])

    from ds_train.zero.stage3_testing import _HFLogits

    ref_losses, ref_params = reference_train(steps, 1, 2, torch.float32,
                                             model_fn=lambda: _HFLogits(_plain_resized(path, resize)))
    for rank in range(2):
        for step in range(steps):
            assert abs(results[rank]["losses"][step] - ref_losses[step][rank]) < 1e-5, (rank, step)
    for name, t in ref_params.items():
        assert (results[0]["final"][name] - t).abs().max().item() < 2e-5, name


def test_zero3_for_transformers_restores_an_existing_deepspeed_module_and_config(tmp_path) -> None:
    import types

    import transformers
    from ds_train.hf import zero3_for_transformers
    from transformers.integrations import deepspeed as hf_ds

    _save("llama", str(tmp_path))
    installed = {"deepspeed": types.ModuleType("deepspeed"), "deepspeed.runtime": types.ModuleType("deepspeed.runtime")}
    before_ref = hf_ds._hf_deepspeed_config_weak_ref
    sys.modules.update(installed)
    try:
        with zero3_for_transformers(config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}):
            import deepspeed

            assert deepspeed is not installed["deepspeed"] and transformers.integrations.is_deepspeed_zero3_enabled()
            assert hf_ds.deepspeed_config()["zero_optimization"]["stage"] == 3
            assert deepspeed.zero.GatheredParameters is __import__("ds_train").zero.GatheredParameters
            with pytest.raises(AttributeError, match="deepspeed.initialize is not provided"):
                deepspeed.initialize  # noqa: B018 - the access is the test
            # transformers' own ZeRO-3 loader needs DeepSpeed internals: one clear error, not a half-built model
            with pytest.raises(AttributeError, match="deepspeed.zero.Init is not provided.*before entering the block"):
                transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
            with pytest.raises(ImportError, match="deepspeed.runtime is not provided"):
                from deepspeed.runtime.zero import partition_parameters  # noqa: F401
        assert all(sys.modules[k] is v for k, v in installed.items())
        assert hf_ds._hf_deepspeed_config_weak_ref is before_ref
    finally:
        for name in installed:
            sys.modules.pop(name, None)
    assert not transformers.integrations.is_deepspeed_zero3_enabled()
    with pytest.raises(ValueError, match="stage is 2"):
        zero3_for_transformers(config={"zero_optimization": {"stage": 2}})


def _engine_owned_worker(path: str) -> str:
    import ds_train
    import transformers
    from ds_train.hf import zero3_for_transformers
    from ds_train.zero import Init

    transformers.logging.set_verbosity_error()
    cfg = stage3_config("fp32", 2)
    with Init(config=cfg):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    try:
        with zero3_for_transformers(engine):
            model.resize_token_embeddings(VOCAB + 3)
    except RuntimeError as e:
        return str(e)
    finally:
        engine.destroy()
    return "no error"


def test_resize_after_initialize_is_refused_naming_the_new_parameters(tmp_path) -> None:
    _save("llama", str(tmp_path))
    for message in run_distributed(_engine_owned_worker, 2, str(tmp_path)):
        assert "resize before ds_train.initialize" in message.lower() and "lm_head.weight" in message, message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([os.path.abspath(__file__), "-q"]))
