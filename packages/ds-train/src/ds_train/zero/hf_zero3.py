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
to a namespace holding one thing, `deepspeed.zero.GatheredParameters`, which is ds_train's; any other
`deepspeed` attribute or submodule is an error naming it. On exit both are restored exactly (an
installed `deepspeed`, or its absence, and the previous transformers config), so nothing outside the
block sees a `deepspeed` module (inside it the switch is process-wide, as transformers' own is: other
threads see it too). What this covers in transformers 5.x: `resize_token_embeddings`
(also with `pad_to_multiple_of`, mean-resizing or the init rule, tied or untied heads) and
`generate()`'s default `synced_gpus`. Building or loading a model inside the block is refused:
transformers' own ZeRO-3 loader patches DeepSpeed internals (`deepspeed.runtime.zero`).

On exit, parameters of `model` that appeared inside the block whole (the resized embedding and head)
are partitioned like `zero.Init` does it: rank 0's values, cut to each rank's piece. This matches
DeepSpeed, where such new parameters take rank 0's values when the engine adopts them. A model whose
parameters an engine already owns cannot take new parameters (its optimizer and flat shards are fixed):
resize before `ds_train.initialize`; the block refuses that case on exit, naming the parameters.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
import weakref
from typing import Any

import torch

from ds_train.zero.init import GatheredParameters, Init, partition_whole_params

__all__ = ["zero3_for_transformers"]

_SHIM_NAMES = ("deepspeed", "deepspeed.zero")
_ADVICE = ("this transformers code path is not supported on ds_train's ZeRO-3 (build or load the model under "
           "ds_train.zero.Init(config=...) before entering the block: transformers' own ZeRO-3 loader reaches into "
           "DeepSpeed's internals)")
# what transformers' `deepspeed_config()` returns when no config is given
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
                             f"(it provides {', '.join(provided)}); {_ADVICE}")
    return __getattr__


def _module(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name, "ds_train's stand-in for the part of deepspeed that transformers' ZeRO-3 branches "
                                 "call on a built model (scoped: see ds_train.zero.hf_zero3)")
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # submodules resolve from sys.modules only (others: _RefuseSubmodules)
    for key, value in attrs.items():
        setattr(mod, key, value)
    mod.__getattr__ = _refuse_other(name, tuple(sorted(attrs)))
    return mod


def _shim_modules() -> dict[str, types.ModuleType]:
    zero = _module("deepspeed.zero", GatheredParameters=GatheredParameters)
    return {"deepspeed": _module("deepspeed", package=True, zero=zero), "deepspeed.zero": zero}


class _RefuseSubmodules(importlib.abc.MetaPathFinder):
    """Inside the block, `import deepspeed.<anything else>` is one clear error instead of 'No module named'."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.startswith("deepspeed.") and fullname not in _SHIM_NAMES:
            raise ImportError(f"{fullname} is not provided by ds_train.hf.zero3_for_transformers; {_ADVICE}")
        return None


class zero3_for_transformers:  # noqa: N801 - used like a function: `with zero3_for_transformers(model):`
    """transformers sees ZeRO-3 inside the block; new whole parameters of `model` are partitioned on exit.

    `model`: the transformers model (or a ds_train engine: its module), built under `ds_train.zero.Init`
    or plain; None when only transformers' switch is wanted. `config`: the ds_train stage-3 config that
    transformers' `deepspeed_config()` returns inside the block (a minimal stage-3 dict when omitted).
    Every rank enters the block (it gathers collectively). Nesting is refused, and so is building or
    loading a model inside it (`from_pretrained`/`from_config` take transformers' own ZeRO-3 loader,
    which needs DeepSpeed's internals: load under `ds_train.zero.Init` before the block).
    """

    _active: zero3_for_transformers | None = None

    def __init__(self, model: Any = None, config: Any = None) -> None:
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"zero3_for_transformers(model=...) takes a torch.nn.Module or a ds_train engine, "
                            f"not {type(model).__name__}")
        from ds_train.engine import DeepSpeedEngine

        self.model: torch.nn.Module | None = model.module if isinstance(model, DeepSpeedEngine) else model
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
        self._saved_modules: dict[str, types.ModuleType] = {}
        self._saved_ref: Any = None
        self._before: set[int] = set()
        self._finder = _RefuseSubmodules()

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
        # an installed deepspeed's modules (a cached submodule would bypass the import system) leave for the block
        self._saved_modules = {name: sys.modules.pop(name) for name in list(sys.modules)
                               if name == "deepspeed" or name.startswith("deepspeed.")}
        sys.modules.update(_shim_modules())
        sys.meta_path.insert(0, self._finder)
        hf_ds._hf_deepspeed_config_weak_ref = weakref.ref(self._hf_config)
        zero3_for_transformers._active = self
        return self

    def __exit__(self, *exc: Any) -> None:
        from transformers.integrations import deepspeed as hf_ds

        try:
            hf_ds._hf_deepspeed_config_weak_ref = self._saved_ref
            if self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
            for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
                del sys.modules[name]
            sys.modules.update(self._saved_modules)
        finally:
            zero3_for_transformers._active = None
        if exc[0] is None and self.model is not None:
            self._partition_new_params()

    def _partition_new_params(self) -> None:
        named = list(self.model.named_parameters())
        # whole parameters that were not there before the block (an engine may keep some whole on purpose)
        new = [(n, p) for n, p in named if not hasattr(p, "ds3") and id(p) not in self._before]
        pieces = [p for _, p in named if hasattr(p, "ds3")]
        if not new or not pieces:  # nothing appeared, or a plain (unpartitioned) model: leave it as it is
            return
        if any(getattr(p, "ds_owner", None) is not None for p in pieces):
            raise RuntimeError(
                f"zero3_for_transformers: parameter(s) {[n for n, _ in new][:6]} appeared after ds_train.initialize "
                "adopted the model (e.g. resize_token_embeddings); the engine's optimizer and shards cannot take "
                "new parameters. Resize before ds_train.initialize (on the model built under zero.Init)")
        groups = {id(getattr(p, "ds_init_group", None)): getattr(p, "ds_init_group", None) for p in pieces}
        if len(groups) != 1:
            raise RuntimeError("zero3_for_transformers: the model's pieces come from several zero.Init groups")
        partition_whole_params(new, next(iter(groups.values())), dtype=pieces[0].ds3.init_shard.dtype)
