"""transformers checkpoints into a ZeRO-3-partitioned model: `from_pretrained` without the whole model in memory.

The model is built from its config under `zero.Init` (already partitioned), then the checkpoint is
read tensor by tensor on rank 0 (safetensors and zip-format `pytorch_model.bin` are memory-mapped, so
one tensor is resident at a time; a legacy non-zip `.bin` is read whole, on rank 0 only; sharded
checkpoints through their `.index.json`)
and each is scattered through `GatheredParameters(modifier_rank=0)`: every rank keeps its piece only.
transformers' own `from_pretrained` also works under `zero.Init` (the DeepSpeed recipe, see `zero/init.py`:
every rank reads the checkpoint and keeps its piece); this helper reads the checkpoint on rank 0 only
and scatters it, for file systems that not every rank can read.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from ds_core import comm
from ds_core.logging import log_dist

from ds_train.zero.init import GatheredParameters, Init

__all__ = ["from_pretrained_partitioned"]


_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' names, in its order of preference


def _checkpoint_files(path: str) -> list[str]:
    for single in _SINGLE_FILES:
        index = os.path.join(path, f"{single}.index.json")
        if os.path.exists(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, n) for n in names]
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise FileNotFoundError(f"{path}: none of {', '.join(_SINGLE_FILES)} or their .index.json")


def _open_on_rank0(file: str) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """The file's keys and a reader of one tensor. safetensors and zip-format .bin are memory-mapped (one
    tensor resident at a time); a legacy (non-zip) .bin cannot be, and is read whole, on rank 0 only."""
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        handle = safe_open(file, framework="pt")
        return sorted(handle.keys()), handle.get_tensor
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    return sorted(state), state.__getitem__


def _broadcast_object(obj: Any) -> Any:
    if not comm.is_initialized() or comm.get_world_size() == 1:
        return obj
    box = [obj]
    comm.broadcast_object_list(box, 0)
    return box[0]


def from_pretrained_partitioned(model_class: Any, path: str, *, config: Any = None,
                                dtype: torch.dtype | None = None, **model_kwargs: Any) -> torch.nn.Module:
    """`model_class` (e.g. `AutoModelForCausalLM` or `LlamaForCausalLM`) from the folder `path`, partitioned.

    `config` is the ds_train config (its bf16/fp16 section picks the dtype unless `dtype` is given).
    Every rank calls it; checkpoint keys that are not in the model and model tensors the checkpoint
    lacks are reported (as transformers does); a shape mismatch is an error naming the key.
    """
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path, **model_kwargs)
    rank = comm.get_rank() if comm.is_initialized() else 0
    with Init(config_dict_or_path=config, dtype=dtype):
        if hasattr(model_class, "from_config"):
            model = model_class.from_config(hf_config)
        else:
            model = model_class(hf_config)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in _checkpoint_files(path):
        keys, read, failure = None, None, None
        if rank == 0:
            try:
                keys, read = _open_on_rank0(file)
            except Exception as exc:  # the other ranks wait for the keys: they must hear of it too
                failure = f"{type(exc).__name__}: {exc}"
        keys, failure = _broadcast_object((keys, failure))
        if failure is not None:
            raise ValueError(f"from_pretrained_partitioned: rank 0 could not read {file}: {failure}")
        for key in keys:
            target = params.get(key)
            if target is None and key not in buffers:
                unexpected.append(key)
                continue
            tensor = read(key) if read is not None else None
            shape = _broadcast_object(tuple(tensor.shape) if tensor is not None else None)
            if target is not None:
                want = target.ds3.shape if hasattr(target, "ds3") else tuple(target.shape)
                if tuple(shape) != tuple(want):
                    raise ValueError(f"{file}: '{key}' has shape {tuple(shape)}, the model expects {tuple(want)}")
                with GatheredParameters([target], modifier_rank=0):
                    if rank == 0:
                        with torch.no_grad():
                            target.data.copy_(tensor)
            else:
                buf = buffers[key]
                with torch.no_grad():
                    if rank == 0:
                        buf.copy_(tensor)
                    if comm.is_initialized() and comm.get_world_size() > 1:
                        comm.broadcast(buf, 0)
            loaded.add(key)
    missing = sorted(k for k in params if k not in loaded and not _tied_to_loaded(model, params, k, loaded))
    if missing or unexpected:
        log_dist(f"from_pretrained_partitioned({path}): missing {missing[:8]}, unexpected {unexpected[:8]}",
                 ranks=[0])
    return model


def _tied_to_loaded(model: torch.nn.Module, params: dict[str, torch.Tensor], key: str, loaded: set[str]) -> bool:
    """True when parameter `key` is the same tensor as one that was loaded (tied embeddings)."""
    return any(params[key] is params[other] for other in loaded if other in params)
