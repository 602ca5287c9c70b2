"""Checkpoints transformers reads whole (legacy non-zip `.bin`, GGUF) under `zero.Init`: exact, read by one rank.

torch cannot memory-map the legacy `.bin` format, and transformers dequantizes and copies every GGUF
tensor, so each process used to hold the whole model while loading. Under zero.Init one rank per node
reads the file and the others map a temporary zip-format copy: the loaded weights equal a plain
single-process `from_pretrained` bit for bit, the copy is gone afterwards, and the private memory a
non-reading rank gains while loading stays near its half of the model (the existing zero.Init memory
bound, 0.7 of the model), where every rank gained the whole model before (the control, same run).
"""
from __future__ import annotations

import os

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.zero.stage3_testing import PeakMemory, hf_model, stage3_config


def _save_legacy(model: torch.nn.Module, path: str) -> None:
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    model.config.save_pretrained(path)


def _save_gguf(path: str, hidden: int, layers: int, vocab: int, inter: int, heads: int, ctx: int) -> None:
    """A float32 Llama GGUF file (`model.gguf`), written with the gguf package's writer, random weights."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(os.path.join(path, "model.gguf"), "llama")
    writer.add_context_length(ctx)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_freq_base(10000.0)
    g = torch.Generator().manual_seed(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (torch.randn(*shape, generator=g) * 0.02).numpy().astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab, hidden)
    for i in range(layers):
        for name, shape in (("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))):
            tensor(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _kwargs(fmt: str) -> dict:
    return {"gguf_file": "model.gguf"} if fmt == "gguf" else {}


def _plain(path: str, fmt: str = "bin") -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path, **_kwargs(fmt))


def _load_worker(path: str, tmp: str, fmt: str) -> dict:
    import importlib
    import tempfile

    import transformers
    from ds_core import comm
    from ds_train.zero import GatheredParameters, Init

    transformers.logging.set_verbosity_error()
    saved_tmp, tempfile.tempdir = tempfile.tempdir, tmp  # where the temporary copy goes
    tmp_before = os.stat(tmp).st_mtime_ns  # a folder's mtime moves when a file is created or removed in it
    try:
        with Init(config=stage3_config("fp32", comm.get_world_size())):
            model = transformers.AutoModelForCausalLM.from_pretrained(path, **_kwargs(fmt))
    finally:
        tempfile.tempdir = saved_tmp
    comm.barrier()
    out = {"left_in_tmp": sorted(os.listdir(tmp)), "tmp_used": os.stat(tmp).st_mtime_ns != tmp_before,
           "all_partitioned": all(hasattr(p, "ds3") and p.numel() == 0 for p in model.parameters()),
           "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
           "readers_restored": transformers.modeling_utils.load_state_dict.__module__ == "transformers.modeling_utils"
           and importlib.import_module("transformers.modeling_gguf_pytorch_utils").load_gguf_checkpoint.__module__
           == "transformers.modeling_gguf_pytorch_utils"}
    with GatheredParameters(list(model.parameters())):
        out["state"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.parametrize("kind,fmt", [("gpt2", "bin"), ("llama", "bin"), ("llama", "gguf")])
def test_unmappable_checkpoint_under_zero_init_loads_exactly_and_leaves_no_copy(tmp_path, kind: str, fmt: str) -> None:
    ckpt, tmp = tmp_path / "ckpt", tmp_path / "tmp"
    ckpt.mkdir()
    tmp.mkdir()
    if fmt == "gguf":
        pytest.importorskip("gguf")
        _save_gguf(str(ckpt), hidden=16, layers=2, vocab=37, inter=24, heads=2, ctx=16)
    else:
        torch.manual_seed(3)
        _save_legacy(hf_model(kind).model, str(ckpt))
        from ds_train.zero.hf_read_once_per_node import is_legacy_torch_file

        assert is_legacy_torch_file(str(ckpt / "pytorch_model.bin"))
    want = dict(_plain(str(ckpt), fmt).named_parameters())
    for res in run_distributed(_load_worker, 2, str(ckpt), str(tmp), fmt):
        assert res["tmp_used"] and res["left_in_tmp"] == []  # a copy was written there, and removed
        assert res["all_partitioned"] and res["readers_restored"]
        assert res["tied"] is (kind == "gpt2")
        assert set(res["state"]) == set(want)
        for name, t in want.items():
            assert torch.equal(res["state"][name], t.detach()), name


def _corrupt_worker(path: str, tmp: str) -> str:
    import tempfile

    import transformers
    from ds_train.zero import Init

    transformers.logging.set_verbosity_error()
    saved_tmp, tempfile.tempdir = tempfile.tempdir, tmp
    try:
        with Init(config=stage3_config("fp32", 2)):
            transformers.AutoModelForCausalLM.from_pretrained(path)
    except RuntimeError as e:
        return str(e)
    finally:
        tempfile.tempdir = saved_tmp
    return "no error"


def test_corrupt_legacy_bin_under_zero_init_is_one_clear_error_on_every_rank(tmp_path) -> None:
    ckpt, tmp = tmp_path / "ckpt", tmp_path / "tmp"
    ckpt.mkdir()
    tmp.mkdir()
    config = hf_model("llama").model.config
    config.dtype = torch.float32  # transformers then skips its shape-only read of the file (dtype="auto")
    config.save_pretrained(str(ckpt))
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x02not a checkpoint" * 100)  # neither zip nor a pickle
    for message in run_distributed(_corrupt_worker, 2, str(ckpt), str(tmp)):  # no rank left waiting
        assert "rank 0 could not read the checkpoint" in message and "pytorch_model.bin" in message, message
    assert os.listdir(tmp) == []  # no partial copy left behind


# -- memory --------------------------------------------------------------------------------------------
def _memory_worker(path: str, warm: str, fmt: str, route: bool) -> int:
    import ctypes
    import gc

    import transformers
    from ds_core import comm
    from ds_train.zero import Init, hf_read_once_per_node

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = stage3_config("fp32", comm.get_world_size())
    with Init(config=cfg):  # warm-up on a tiny model: imports the model's code (tens of MB, once) without
        transformers.AutoModelForCausalLM.from_pretrained(warm, **_kwargs(fmt))  # leaving a model-sized heap
    gc.collect()
    # the worker pool reuses processes: hand freed heap back to the OS, or an earlier whole read would be
    # reused unseen (glibc keeps freed memory and raises its mmap threshold after large frees)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    saved = hf_read_once_per_node.UnmappableReaders.install_available
    if not route:  # the control: transformers' reader as it is (every rank reads the whole file)
        hf_read_once_per_node.UnmappableReaders.install_available = lambda self: None
    try:
        with PeakMemory() as meter:
            with Init(config=cfg):
                model = transformers.AutoModelForCausalLM.from_pretrained(path, **_kwargs(fmt))
    finally:
        hf_read_once_per_node.UnmappableReaders.install_available = saved
    del model
    gc.collect()
    return meter.peak - meter.start


@pytest.mark.parametrize("fmt", ["bin", "gguf"])
def test_unmappable_checkpoint_under_zero_init_is_read_whole_by_one_rank_only(tmp_path, fmt: str) -> None:
    big, warm = tmp_path / "big", tmp_path / "warm"
    big.mkdir()
    warm.mkdir()
    if fmt == "gguf":  # ~69 MB of fp32
        pytest.importorskip("gguf")
        _save_gguf(str(big), hidden=384, layers=8, vocab=4096, inter=1024, heads=4, ctx=64)
        _save_gguf(str(warm), hidden=16, layers=2, vocab=37, inter=24, heads=2, ctx=16)
    else:  # ~62 MB of fp32
        import transformers

        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=384,
                                                                     n_layer=8, n_head=4))
        _save_legacy(model, str(big))
        del model
        _save_legacy(hf_model("gpt2").model, str(warm))
    full = sum(p.numel() for p in _plain(str(big), fmt).parameters()) * 4
    routed = run_distributed(_memory_worker, 2, str(big), str(warm), fmt, True)
    control = run_distributed(_memory_worker, 2, str(big), str(warm), fmt, False)
    print(f"{fmt} under zero.Init, private memory gained / model size ({full / 2**20:.0f} MiB): routed "
          f"{[round(g / full, 3) for g in routed]}, every rank reading {[round(g / full, 3) for g in control]}")
    assert all(g > 0.9 * full for g in control), control  # the meter sees the whole model on each reader
    assert routed[1] < 0.7 * full, routed  # rank 1 maps rank 0's copy: its half plus one tensor in flight
    assert routed[0] < 1.25 * full, routed  # rank 0 reads the file whole once (no second whole copy)
