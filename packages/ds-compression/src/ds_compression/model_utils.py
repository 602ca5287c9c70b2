"""Finding, replacing and loading modules: the small tree surgery every method shares."""
from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CompressionInputError",
    "get_module",
    "set_module",
    "iter_linears",
    "select_linears",
    "find_block_list",
    "load_model_dir",
    "model_bytes",
    "count_parameters",
]


class CompressionInputError(ValueError):
    """Input that cannot be compressed as asked: the message names what and where."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, new)


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            yield name, mod


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A pattern matches as a glob over the whole name, or as a regex anywhere in it."""
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return True
        try:
            if re.search(p, name):
                return True
        except re.error:  # a glob such as "*down_proj" is not a valid regex; the glob test above decides
            continue
    return False


def select_linears(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Linear]]:
    """nn.Linear modules whose names match `include` (glob or regex; all when None) and not `exclude`.

    A module matched by `include` that is not an nn.Linear is an error: compressing it silently as
    something else, or skipping it, would both surprise the user.
    """
    include = list(include) if include else None
    exclude = list(exclude)
    chosen = []
    for name, mod in model.named_modules():
        if not name or _matches(name, exclude):
            continue
        if include is not None and not _matches(name, include):
            continue
        if type(mod) is nn.Linear:
            chosen.append((name, mod))
        elif include is not None and not list(mod.children()) and list(mod.parameters(recurse=False)):
            raise CompressionInputError(
                f"module '{name}' is a {type(mod).__name__}, which this method does not support "
                "(only torch.nn.Linear); narrow --modules / modules= or exclude it"
            )
    if not chosen:
        where = f" matching {include}" if include else ""
        raise CompressionInputError(
            f"no torch.nn.Linear layers{where} found in {type(model).__name__}; nothing to compress "
            "(layers such as transformers' Conv1D are not supported)"
        )
    return chosen


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer's stack of blocks: the longest ModuleList of identical module types."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise CompressionInputError(f"{type(model).__name__} has no list of layers (nn.ModuleList) to work on")
    return best


def count_parameters(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.state_dict().values()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def load_model_dir(path: str | os.PathLike, gguf_file: str | None = None, task: str = "auto") -> nn.Module:
    """A Hugging Face model from a local directory (config.json + weights, or a GGUF file), in fp32."""
    p = Path(path)
    if not p.is_dir():
        raise CompressionInputError(f"model directory not found: {p}")
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if gguf_file is None and not (p / "config.json").is_file():
        if len(ggufs) == 1:
            gguf_file = ggufs[0]
        else:
            hint = f" (it holds GGUF files {ggufs}: pass gguf_file=/--gguf-file)" if ggufs else ""
            raise CompressionInputError(f"{p} is not a model directory: no config.json{hint}")
    if gguf_file is None:
        weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin"))
        if not weights:
            raise CompressionInputError(f"{p} has a config.json but no weights (*.safetensors or *.bin)")
    import transformers

    kwargs = {"dtype": torch.float32}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    config = transformers.AutoConfig.from_pretrained(str(p), **({"gguf_file": gguf_file} if gguf_file else {}))
    archs = getattr(config, "architectures", None) or []
    wants_lm = any(a.endswith("ForCausalLM") for a in archs) or gguf_file is not None
    if task == "causal-lm" or (task == "auto" and wants_lm):
        auto = transformers.AutoModelForCausalLM
    elif archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0]).from_pretrained(str(p), **kwargs).eval()
    else:
        auto = transformers.AutoModel
    return auto.from_pretrained(str(p), **kwargs).eval()
