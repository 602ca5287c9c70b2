"""transformers' own ZeRO-3 code paths on ds_train's partitioned parameters, for the length of a `with` block.

transformers decides by `transformers.integrations.deepspeed.is_deepspeed_zero3_enabled()` whether a
model's parameters are ZeRO-3 placeholders; when they are, it gathers them with
`deepspeed.zero.GatheredParameters` before reading shapes or values (`resize_token_embeddings`, the
weight initialization of `from_config`), and `generate()` turns on `synced_gpus` (every rank keeps
running forward passes until all are done, since each forward is a collective). On a model built under
`ds_train.zero.Init` that switch is off, so e.g. `resize_token_embeddings` unpacks the shape of an
empty placeholder and fails.

    with ds_train.hf.zero3_for_transformers(model):
        model.resize_token_embeddings(len(tokenizer))

Inside the block, and only there: transformers' switch answers True, and the name `deepspeed` resolves
to a small namespace that forwards to ds_train (`zero.GatheredParameters`, `zero.Init`,
`comm.get_rank/get_world_size`, `accelerator.get_accelerator`); any other `deepspeed` attribute is an
AttributeError naming it. On exit both are restored exactly (an installed `deepspeed`, or its absence,
and the previous transformers config), so nothing outside the block sees a `deepspeed` module.

On exit, parameters of `model` that appeared inside the block whole (the resized embedding and head)
are partitioned like `zero.Init` does it: rank 0's values, cut to each rank's piece. This matches
DeepSpeed, where such new parameters take rank 0's values when the engine adopts them. A model whose
parameters an engine already owns cannot take new parameters (its optimizer and flat shards are fixed):
resize before `ds_train.initialize`; the block refuses that case on exit, naming the parameters.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
import weakref
from typing import Any

import torch
from ds_core import comm

from ds_train.zero.init import GatheredParameters, Init

__all__ = ["zero3_for_transformers"]

_SHIM_NAMES = ("deepspeed", "deepspeed.zero", "deepspeed.comm", "deepspeed.accelerator")
# what transformers' `deepspeed_config()` returns when no config is given (it passes it to zero.Init)
_DEFAULT_CONFIG = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


class _TransformersDeepSpeedConfig:
    """What transformers keeps a weak reference to (its `HfDeepSpeedConfig`): the stage-3 answer and the dict."""

    def __init__(self, config: dict) -> None:
        self.config = config

    def is_zero3(self) -> bool:
        return True


def _refuse_other(module_name: str, provided: tuple[str, ...]) -> Any:
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{module_name}.{name} is not provided by ds_train.hf.zero3_for_transformers "
                             f"(it provides {', '.join(provided)}); this transformers code path is not supported "
                             "on ds_train's ZeRO-3")
    return __getattr__


def _module(name: str, doc: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # submodules resolve from sys.modules only
    for key, value in attrs.items():
        setattr(mod, key, value)
    mod.__getattr__ = _refuse_other(name, tuple(sorted(attrs)))
    return mod


def _shim_modules() -> dict[str, types.ModuleType]:
    from ds_core.accelerator import get_accelerator

    doc = "ds_train's stand-in for the parts of deepspeed that transformers calls (scoped, see ds_train.zero.hf_zero3)"
    zero = _module("deepspeed.zero", doc, GatheredParameters=GatheredParameters, Init=Init)
    dist = _module("deepspeed.comm", doc, get_rank=_rank, get_world_size=_world_size)
    accel = _module("deepspeed.accelerator", doc, get_accelerator=get_accelerator)
    root = _module("deepspeed", doc, package=True, zero=zero, comm=dist, accelerator=accel)
    return {"deepspeed": root, "deepspeed.zero": zero, "deepspeed.comm": dist, "deepspeed.accelerator": accel}


def _rank(group: Any = None) -> int:
    return comm.get_rank(group) if comm.is_initialized() else 0


def _world_size(group: Any = None) -> int:
    return comm.get_world_size(group) if comm.is_initialized() else 1


class zero3_for_transformers:  # noqa: N801 - used like a function: `with zero3_for_transformers(model):`
    """transformers sees ZeRO-3 inside the block; new whole parameters of `model` are partitioned on exit.

    `model`: the transformers model (or a ds_train engine: its module), built under `ds_train.zero.Init`
    or plain; None when only transformers' switch is wanted. `config`: the ds_train config that
    transformers hands to `deepspeed.zero.Init` when it builds a model inside the block (`from_config`);
    a stage-3 config with no precision section (fp32) when omitted. Every rank enters the block (it
    gathers collectively). Nesting is refused.
    """

    _active: zero3_for_transformers | None = None

    def __init__(self, model: Any = None, config: Any = None) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"zero3_for_transformers(model=...) takes a torch.nn.Module or a ds_train engine, "
                            f"not {type(model).__name__}")
        module = getattr(model, "module", model) if model is not None else None
        self.model: torch.nn.Module | None = module
        if config is None:
            config = _DEFAULT_CONFIG
        else:
            from ds_core.config import load_config_source

            config = load_config_source(config)
            stage = config.get("zero_optimization", {}).get("stage", 0)
            if stage != 3:
                raise ValueError(f"zero3_for_transformers(config=...): zero_optimization.stage is {stage}, "
                                 "this block is for stage 3")
        self._hf_config = _TransformersDeepSpeedConfig(config)
        self._saved_modules: dict[str, types.ModuleType | None] = {}
        self._saved_ref: Any = None
        self._before: set[int] = set()

    def __enter__(self) -> zero3_for_transformers:
        from transformers.integrations import deepspeed as hf_ds

        if zero3_for_transformers._active is not None:
            raise RuntimeError("zero3_for_transformers is already active; nesting is not supported")
        if Init._active is not None:
            raise RuntimeError("zero3_for_transformers inside zero.Init is not supported: build or load the model "
                               "under zero.Init first, then enter this block")
        if self.model is not None:
            self._before = {id(p) for p in self.model.parameters()}
        self._saved_ref = hf_ds._hf_deepspeed_config_weak_ref
        self._saved_modules = {name: sys.modules.get(name) for name in _SHIM_NAMES}
        sys.modules.update(_shim_modules())
        hf_ds._hf_deepspeed_config_weak_ref = weakref.ref(self._hf_config)
        zero3_for_transformers._active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        from transformers.integrations import deepspeed as hf_ds

        try:
            hf_ds._hf_deepspeed_config_weak_ref = self._saved_ref
            for name, saved in self._saved_modules.items():
                if saved is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = saved
        finally:
            zero3_for_transformers._active = None
        if exc[0] is None and self.model is not None:
            self._partition_new_params()

    def _partition_new_params(self) -> None:
        named = list(self.model.named_parameters())
        new = [(n, p) for n, p in named if not hasattr(p, "ds3")]
        pieces = [p for _, p in named if hasattr(p, "ds3")]
        if not new or not pieces:  # nothing appeared, or a plain (unpartitioned) model: leave it as it is
            return
        owned = [p for p in pieces if getattr(p, "ds_owner", None) is not None]
        if owned:
            names = [n for n, p in new if id(p) not in self._before] or [n for n, _ in new]
            raise RuntimeError(
                f"zero3_for_transformers: parameter(s) {names[:6]} appeared after ds_train.initialize adopted the "
                "model (e.g. resize_token_embeddings); the engine's optimizer and shards cannot take new "
                "parameters. Resize before ds_train.initialize (on the model built under zero.Init)")
        groups = {id(getattr(p, "ds_init_group", None)): getattr(p, "ds_init_group", None) for p in pieces}
        if len(groups) != 1:
            raise RuntimeError("zero3_for_transformers: the model's pieces come from several zero.Init groups")
        dtype = pieces[0].ds3.init_shard.dtype if pieces[0].ds3.init_shard is not None else None
        Init(module=self.model, data_parallel_group=next(iter(groups.values())), dtype=dtype)
