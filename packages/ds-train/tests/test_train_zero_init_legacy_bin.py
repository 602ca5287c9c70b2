"""A legacy-format (non-zip) `pytorch_model.bin` under `zero.Init`: exact, and read whole by one rank per node.

torch cannot memory-map the legacy format, so transformers' reader loads it whole into each process.
Under zero.Init one rank per node reads it and the others map a temporary zip-format copy: the loaded
weights equal a plain single-process `from_pretrained` bit for bit, the copy is gone afterwards, and the
private memory a non-reading rank gains while loading stays near its half of the model (the existing
zero.Init memory bound, 0.7 of the model), where every rank gained the whole model before (control).
"""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.zero.stage3_testing import hf_model, stage3_config


def _save_legacy(model: torch.nn.Module, path: str) -> None:
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    model.config.save_pretrained(path)


def _plain(path: str) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path)


def _load_worker(path: str, tmp: str) -> dict:
    import tempfile

    import transformers
    from ds_core import comm
    from ds_train.zero import GatheredParameters, Init

    transformers.logging.set_verbosity_error()
    saved_tmp, tempfile.tempdir = tempfile.tempdir, tmp  # where the temporary copy goes
    try:
        with Init(config=stage3_config("fp32", comm.get_world_size())):
            model = transformers.AutoModelForCausalLM.from_pretrained(path)
    finally:
        tempfile.tempdir = saved_tmp
    comm.barrier()
    out = {"left_in_tmp": sorted(os.listdir(tmp)),
           "all_partitioned": all(hasattr(p, "ds3") and p.numel() == 0 for p in model.parameters()),
           "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
           "reader_restored": transformers.modeling_utils.load_state_dict.__module__ == "transformers.modeling_utils"}
    with GatheredParameters(list(model.parameters())):
        out["state"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_legacy_bin_under_zero_init_loads_exactly_and_leaves_no_copy(tmp_path, kind: str) -> None:
    ckpt, tmp = tmp_path / "ckpt", tmp_path / "tmp"
    ckpt.mkdir()
    tmp.mkdir()
    torch.manual_seed(3)
    _save_legacy(hf_model(kind).model, str(ckpt))
    from ds_train.zero.hf_legacy_bin import is_legacy_torch_file

    assert is_legacy_torch_file(str(ckpt / "pytorch_model.bin"))
    want = dict(_plain(str(ckpt)).named_parameters())
    for res in run_distributed(_load_worker, 2, str(ckpt), str(tmp)):
        assert res["left_in_tmp"] == [] and res["all_partitioned"] and res["reader_restored"]
        assert res["tied"] is (kind == "gpt2")
        assert set(res["state"]) == set(want)
        for name, t in want.items():
            assert torch.equal(res["state"][name], t.detach()), name


# -- memory --------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class _PeakAnon:
    """Samples this process's anonymous resident set (its private memory) every millisecond."""

    def __enter__(self) -> _PeakAnon:
        self.start = self.peak = _status("RssAnon:")
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, _status("RssAnon:"))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _status("RssAnon:"))


def _memory_worker(path: str, warm: str, route: bool) -> int:
    import ctypes
    import gc

    import transformers
    from ds_core import comm
    from ds_train.zero import Init, hf_legacy_bin

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = stage3_config("fp32", comm.get_world_size())
    with Init(config=cfg):  # warm-up on a tiny model: imports the model's code (tens of MB, once) without
        transformers.AutoModelForCausalLM.from_pretrained(warm)  # leaving a model-sized free heap behind
    gc.collect()
    # the worker pool reuses processes: hand freed heap back to the OS, or an earlier whole read would be
    # reused unseen (glibc keeps freed memory and raises its mmap threshold after large frees)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    saved = hf_legacy_bin.route_legacy_bin_reads
    if not route:  # the control: transformers' reader as it is (every rank reads the whole file)
        hf_legacy_bin.route_legacy_bin_reads = lambda group: (lambda: None)
    try:
        with _PeakAnon() as meter:
            with Init(config=cfg):
                model = transformers.AutoModelForCausalLM.from_pretrained(path)
    finally:
        hf_legacy_bin.route_legacy_bin_reads = saved
    del model
    gc.collect()
    return meter.peak - meter.start


def test_legacy_bin_under_zero_init_is_read_whole_by_one_rank_only(tmp_path) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=4096, n_positions=64, n_embd=384, n_layer=8, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg)
    full = sum(p.numel() for p in model.parameters()) * 4  # ~62 MB of fp32
    big, warm = tmp_path / "big", tmp_path / "warm"
    big.mkdir()
    warm.mkdir()
    _save_legacy(model, str(big))
    del model
    _save_legacy(hf_model("gpt2").model, str(warm))
    routed = run_distributed(_memory_worker, 2, str(big), str(warm), True)
    control = run_distributed(_memory_worker, 2, str(big), str(warm), False)
    print(f"legacy .bin under zero.Init, private memory gained / model size: routed {[g / full for g in routed]}, "
          f"every rank reading {[g / full for g in control]}")
    assert all(g > 0.9 * full for g in control), control  # the meter sees the whole model on each reader
    assert routed[1] < 0.7 * full, routed  # rank 1 maps rank 0's copy: its half plus one tensor in flight
    assert routed[0] < 1.25 * full, routed  # rank 0 reads the file whole once (no second whole copy)
