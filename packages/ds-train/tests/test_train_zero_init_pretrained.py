"""transformers' own `from_pretrained` under `ds_train.zero.Init`: built partitioned, loaded piece by piece.

The user code is the DeepSpeed recipe, unchanged: `with zero.Init(config=...): model =
AutoModelForCausalLM.from_pretrained(dir)`. Each rank must end with only its piece of every parameter,
the gathered weights must equal a plain single-process `from_pretrained` bit for bit, tied weights
must stay tied, and the model must train at stage 3 like the plain model does (losses within 1e-5,
weights within 2e-5, the tolerances of the other stage-3 tests). Memory: the private (anonymous)
resident set a rank gains while loading stays near its half of the model, where a plain load gains
the whole model.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.testing import reference_train, train_steps
from ds_train.zero.stage3_testing import PeakMemory, hf_model, stage3_config


def _save(kind: str, path: str, seed: int = 3, **save_kwargs) -> None:
    torch.manual_seed(seed)
    hf_model(kind).model.save_pretrained(path, **save_kwargs)


def _plain(path: str, cls_name: str = "AutoModelForCausalLM", **kwargs) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return getattr(transformers, cls_name).from_pretrained(path, **kwargs)


def _load_worker(path: str, cls_name: str, kwargs: dict) -> dict:
    import transformers
    from ds_core import comm
    from ds_train.zero import GatheredParameters, Init

    transformers.logging.set_verbosity_error()
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "0"  # the user's own value: Init must restore it
    with Init(config=stage3_config("fp32", comm.get_world_size())):
        model = getattr(transformers, cls_name).from_pretrained(path, **kwargs)
    env_after = os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
    out = {
        "env_after": env_after,
        "all_partitioned": all(hasattr(p, "ds3") and p.numel() == 0 for p in model.parameters()),
        "shards": {n: p.ds3.init_shard.numel() for n, p in model.named_parameters()},
        "tied": model.get_input_embeddings().weight is model.get_output_embeddings().weight
        if model.get_output_embeddings() is not None else None,
    }
    with GatheredParameters(list(model.parameters())):
        out["state"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    # after exit: nothing is intercepted any more (constructors and parameter registration restored)
    with torch.device("meta"):
        later = torch.nn.Linear(3, 3)
    later.weight = torch.nn.Parameter(torch.ones(3, 3))
    out["restored"] = not hasattr(later.weight, "ds3") and later.weight.shape == (3, 3) \
        and not hasattr(later.bias, "ds_pending_init")
    return out


def _check_loaded(results: list[dict], want: dict[str, torch.Tensor], skip: tuple = ()) -> None:
    for res in results:
        assert res["env_after"] == "0" and res["restored"] and res["all_partitioned"]
        assert set(res["state"]) == set(want)
        for name, t in want.items():
            assert res["shards"][name] == -(-t.numel() // 2), name  # half of each parameter, padded
            if name not in skip:
                assert torch.equal(res["state"][name], t.detach()), name


@pytest.mark.parametrize("kind,fmt", [("gpt2", "safetensors"), ("llama", "safetensors"), ("llama", "sharded"),
                                      ("gpt2", "bin")])
def test_from_pretrained_under_zero_init_loads_exactly_the_checkpoint(tmp_path, kind: str, fmt: str) -> None:
    path = str(tmp_path)
    if fmt == "bin":  # a pytorch_model.bin (zip format: transformers memory-maps it too)
        torch.manual_seed(3)
        model = hf_model(kind).model
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
        model.config.save_pretrained(path)
    else:
        _save(kind, path, **({"max_shard_size": "4KB"} if fmt == "sharded" else {}))
    if fmt == "sharded":  # really a sharded checkpoint
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            assert len(set(json.load(f)["weight_map"].values())) > 2
    results = run_distributed(_load_worker, 2, path, "AutoModelForCausalLM", {})
    _check_loaded(results, dict(_plain(path).named_parameters()))
    assert all(r["tied"] is (kind == "gpt2") for r in results)  # GPT-2's head stays the embedding


def test_from_pretrained_under_zero_init_initializes_missing_keys_equally_on_every_rank(tmp_path) -> None:
    # a classification head the causal-LM checkpoint lacks: transformers initializes it (each rank its
    # own draw); Init partitions it on exit with rank 0's values, so the ranks agree
    path = str(tmp_path)
    _save("llama", path)
    results = run_distributed(_load_worker, 2, path, "LlamaForSequenceClassification", {"num_labels": 3})
    want = dict(_plain(path, "LlamaForSequenceClassification", num_labels=3).named_parameters())
    _check_loaded(results, want, skip=("score.weight",))
    score = results[0]["state"]["score.weight"]
    assert torch.equal(score, results[1]["state"]["score.weight"]) and score.abs().sum() > 0


def _meta_leftover_worker() -> str:
    from ds_train.zero import Init

    try:
        with Init(), torch.device("meta"):
            layer = torch.nn.Linear(4, 4)  # noqa: F841 (alive at exit, never given real values)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_zero_init_refuses_a_meta_parameter_that_was_never_loaded() -> None:
    messages = run_distributed(_meta_leftover_worker, 2)
    assert all("still on the meta device" in m and "'weight'" in m for m in messages)


def _disk_offload_worker(path: str) -> str:
    import transformers
    from ds_train.zero import Init

    transformers.logging.set_verbosity_error()
    try:
        with Init():
            transformers.AutoModelForCausalLM.from_pretrained(path, device_map={"": "disk"},
                                                              offload_folder=os.path.join(path, "offload"))
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_from_pretrained_under_zero_init_refuses_a_disk_device_map_by_name(tmp_path) -> None:
    _save("llama", str(tmp_path))
    for message in run_distributed(_disk_offload_worker, 2, str(tmp_path)):
        assert "'model.embed_tokens.weight'" in message and "device_map" in message


def _logits(path: str) -> torch.nn.Module:
    from ds_train.zero.stage3_testing import _HFLogits

    return _HFLogits(_plain(path))


def _train_worker(path: str, steps: int) -> dict:
    import ds_train
    import transformers
    from ds_core import comm
    from ds_train.zero import Init
    from ds_train.zero.stage3_testing import _HFLogits

    transformers.logging.set_verbosity_error()
    rank = comm.get_rank()
    cfg = stage3_config("fp32", 2)
    with Init(config=cfg):
        model = _HFLogits(transformers.AutoModelForCausalLM.from_pretrained(path))
    model.train()
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    losses = train_steps(engine, steps, rank)
    final = engine.get_fp32_state_dict()
    engine.destroy()
    return {"losses": losses, "final": final}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_from_pretrained_under_zero_init_trains_like_the_plain_model(tmp_path, kind: str) -> None:
    path = str(tmp_path)
    _save(kind, path)
    results = run_distributed(_train_worker, 2, path, 6)
    ref_losses, ref_params = reference_train(6, 1, 2, torch.float32, model_fn=lambda: _logits(path))
    for rank in range(2):
        for step in range(6):
            assert abs(results[rank]["losses"][step] - ref_losses[step][rank]) < 1e-5, (rank, step)
    for name, t in ref_params.items():
        assert (results[0]["final"][name] - t).abs().max().item() < 2e-5, name


# -- memory --------------------------------------------------------------------------------------------
def _memory_worker(path: str) -> dict:
    import gc

    import transformers
    from ds_core import comm
    from ds_train.zero import Init

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = stage3_config("fp32", comm.get_world_size())
    with Init(config=cfg):  # warm-up: the first load imports the model's code (tens of MB, once)
        transformers.AutoModelForCausalLM.from_pretrained(path)
    gc.collect()
    with PeakMemory() as under_init:
        with Init(config=cfg):
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
    held = sum(p.ds3.init_shard.numel() * 4 for p in model.parameters())
    del model
    gc.collect()
    # control: a plain load that reads the files into memory (a plain mmap load stays lazily file-backed)
    with PeakMemory() as plain:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, disable_mmap=True)
    del model
    gc.collect()
    return {"init": under_init.gained, "plain": plain.gained, "held": held,
            "init_file": under_init.file_peak - under_init.file_start}


def test_from_pretrained_under_zero_init_never_holds_the_whole_model(tmp_path) -> None:
    import transformers

    path = str(tmp_path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=384, n_layer=8, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg)
    full = sum(p.numel() for p in model.parameters()) * 4  # ~62 MB of fp32
    model.save_pretrained(path, max_shard_size="20MB")
    del model
    results = run_distributed(_memory_worker, 2, path)
    for res in results:
        assert res["held"] <= full / 2 + 4096
        assert res["plain"] > 0.9 * full, res  # the meter sees a whole model when there is one
        # private memory: this rank's half plus one tensor in flight (the checkpoint's mmap'd pages are
        # the node's shared page cache, clean and reclaimable, and unmapped when loading ends)
        assert res["init"] < 0.7 * full, res


def _class_defined_inside_worker() -> dict:
    from ds_train.zero import Init

    with Init():
        class Late(torch.nn.Module):  # defined (as a lazily imported model file would be) inside the context
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.ones(6))

        inside = Late()
    outside = Late()
    return {"inside": hasattr(inside.w, "ds3") and inside.w.numel() == 0,
            "outside_whole": not hasattr(outside.w, "ds3") and outside.w.numel() == 6,
            "hook_removed": "__init_subclass__" not in torch.nn.Module.__dict__}


def test_zero_init_wraps_module_classes_defined_inside_the_context() -> None:
    for res in run_distributed(_class_defined_inside_worker, 2):
        assert res == {"inside": True, "outside_whole": True, "hook_removed": True}


# -- frozen parameters ---------------------------------------------------------------------------------
def _frozen_worker(use_init: bool) -> dict:
    import ds_train
    from ds_core import comm
    from ds_train.testing import TinyLM
    from ds_train.zero import Init

    rank = comm.get_rank()
    cfg = stage3_config("fp32", 2)
    torch.manual_seed(0)  # rank 0's draw is the model either way (Init and the engine broadcast it)
    if use_init:
        with Init(config=cfg):
            model = TinyLM()
    else:
        model = TinyLM()
    for p in model.up.parameters():
        p.requires_grad_(False)
    engine, *_ = ds_train.initialize(model=model, config=cfg)
    losses = train_steps(engine, 4, rank)
    frozen = model.up.weight
    out = {"losses": losses, "partitioned": hasattr(frozen, "ds3") and frozen.numel() == 0}
    engine.destroy()
    return out


def test_frozen_parameters_built_under_zero_init_stay_partitioned_and_train_the_same() -> None:
    with_init = run_distributed(_frozen_worker, 2, True)
    plain = run_distributed(_frozen_worker, 2, False)
    for rank in range(2):
        for a, b in zip(with_init[rank]["losses"], plain[rank]["losses"]):
            assert abs(a - b) < 1e-6
    # 1/N of the frozen weight per rank, gathered for use: built under zero.Init or handed over whole
    assert all(r["partitioned"] for r in with_init + plain)
