"""`from_pretrained_partitioned` (rank 0 alone reads the files) on `pytorch_model.bin` checkpoints.

Zip-format `.bin` (memory-mapped), legacy non-zip `.bin` (read whole on rank 0 only) and a sharded
`.bin` with its `pytorch_model.bin.index.json` load bit for bit like a plain single-process
`from_pretrained`, each rank keeping only its pieces; a corrupt file is one error on every rank (the
ranks waiting for rank 0 hear of it instead of hanging).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from ds_core.testing import run_distributed
from ds_train.zero.stage3_testing import hf_model, stage3_config


def _worker(path: str) -> dict:
    import transformers
    from ds_train.zero import GatheredParameters, from_pretrained_partitioned

    transformers.logging.set_verbosity_error()
    try:
        model = from_pretrained_partitioned(transformers.AutoModelForCausalLM, path, config=stage3_config("fp32", 2))
    except ValueError as e:
        return {"error": str(e)}
    out = {"partitioned": all(hasattr(p, "ds3") and p.numel() == 0 for p in model.parameters())}
    with GatheredParameters(list(model.parameters())):
        out["state"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def _write(model: torch.nn.Module, path: str, fmt: str) -> None:
    state = model.state_dict()
    model.config.save_pretrained(path)
    if fmt == "sharded":  # two files and the index transformers writes for them
        keys = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
        for name, part in halves.items():
            torch.save({k: state[k] for k in part}, os.path.join(path, name))
        weight_map = {k: name for name, part in halves.items() for k in part}
        with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        torch.save(state, os.path.join(path, "pytorch_model.bin"), _use_new_zipfile_serialization=fmt == "zip")


@pytest.mark.parametrize("kind,fmt", [("gpt2", "zip"), ("gpt2", "legacy"), ("llama", "legacy"), ("llama", "sharded")])
def test_from_pretrained_partitioned_loads_bin_checkpoints_exactly(tmp_path, kind: str, fmt: str) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(3)
    _write(hf_model(kind).model, str(tmp_path), fmt)
    want = dict(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).named_parameters())
    for res in run_distributed(_worker, 2, str(tmp_path)):
        assert res["partitioned"] and set(res["state"]) == set(want)
        for name, t in want.items():
            assert torch.equal(res["state"][name], t.detach()), name


def test_from_pretrained_partitioned_corrupt_file_is_one_error_on_every_rank(tmp_path) -> None:
    hf_model("llama").model.config.save_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x02not a checkpoint" * 100)
    for res in run_distributed(_worker, 2, str(tmp_path)):
        assert "rank 0 could not read" in res.get("error", "") and "pytorch_model.bin" in res["error"], res
