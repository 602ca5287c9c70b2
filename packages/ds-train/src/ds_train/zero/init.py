"""`zero.Init` (build a model already partitioned) and `GatheredParameters` (whole parameters for a while).

Under `Init`, every `torch.nn.Module` constructor is wrapped: once a module's own `__init__` has run,
each parameter it created is broadcast from rank 0 (so every rank holds the same initial values),
cut to this rank's piece and its storage dropped. The whole model therefore never exists in one
process; only the parameters of the module being built do, for a moment. The ZeRO-3 strategy later
adopts these pieces as they are.

A library that builds the model on the meta device and loads the weights afterwards (transformers'
`from_pretrained` in 5.x does: `with zero.Init(...): AutoModelForCausalLM.from_pretrained(dir)`) gets
the same result without ever holding the whole model: a meta parameter stays *pending* (it costs
nothing), and when the loader registers the real tensor in its place (torch's documented
parameter-registration hook, installed only while `Init` is active) that tensor is cut to this rank's
piece at once. Every rank reads the same checkpoint, so loaded values are not broadcast. Parameters the
library creates for itself (keys the checkpoint lacks, which it initializes after registering them)
stay whole until `Init` exits and are then partitioned with rank 0's values. While `Init` is active,
transformers' loader runs on the calling thread (`HF_DEACTIVATE_ASYNC_LOAD=1`, restored on exit): its
thread pool would otherwise read tensors ahead with no bound, up to the whole model at once. A `.bin`
in torch's legacy (non-zip) format and a GGUF file, which transformers reads whole, are read by one rank
per node and mapped by the others from a temporary zip-format copy (`zero/hf_read_once_per_node.py`).

`GatheredParameters(params, modifier_rank=r)` all-gathers parameters on every rank; on exit, rank r's
values are broadcast and written back into the shards (and the fp32 master copy when an engine owns
the parameters). With `modifier_rank=None`, in-place changes are written back only if made (every
rank must then make the same change).
"""
from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from ds_core import comm

from ds_train.zero.stage3_params import GATHERED, RELEASED, Stage3Param

__all__ = ["Init", "GatheredParameters", "gather_init_param", "partition_whole_params"]

# transformers' switch (documented among its environment variables) for loading on the calling thread
_SYNC_LOAD_ENV = "HF_DEACTIVATE_ASYNC_LOAD"


def _world(group: Any) -> tuple[int, int]:
    if not comm.is_initialized():
        return 1, 0
    return comm.get_world_size(group), comm.get_rank(group)


def _src(group: Any, rank: int) -> int:
    return comm.get_global_rank(group, rank) if group is not None else rank


class Init:
    """Context manager: modules constructed inside have their parameters partitioned at once.

    DeepSpeed's arguments: `module` (partition an existing module instead), `data_parallel_group`,
    `config_dict_or_path` / `config` (its bf16/fp16 section picks the dtype), `dtype`, `enabled`,
    `remote_device` (None or "cpu": shards live in host memory), `pin_memory`. Others are refused.
    """

    _active: Init | None = None

    def __init__(self, module: torch.nn.Module | None = None, data_parallel_group: Any = None,
                 mem_efficient_linear: bool = True, remote_device: str | None = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: torch.dtype | None = None, mpu: Any = None, **unsupported: Any) -> None:
        bad = {k: v for k, v in unsupported.items() if v not in (None, False)}
        if bad:
            raise ValueError(f"zero.Init: argument(s) {sorted(bad)} are not supported")
        if mpu is not None:
            raise ValueError("zero.Init(mpu=...) is not supported; pass data_parallel_group")
        if remote_device not in (None, "cpu", "none"):
            raise ValueError(f"zero.Init(remote_device={remote_device!r}) is not supported; use None or 'cpu' "
                             "(NVMe placement happens when the engine adopts the shards)")
        self.group = data_parallel_group
        self.enabled = enabled
        self.pin_memory = pin_memory
        source = config_dict_or_path if config_dict_or_path is not None else config
        self.dtype = dtype or _config_dtype(source)
        if _offloads_to_nvme(source):
            from ds_train.offload.swap_folder import return_freed_buffers_to_os

            return_freed_buffers_to_os()  # the pieces of a huge model must not leave heap garbage behind
        self._patched: list[tuple[type, Any]] = []
        self._registration_hook: Any = None
        self._saved_env: str | None = None
        self._unmappable_readers: Any = None
        # modules that held a meta parameter: they are checked (and their late parameters partitioned) on exit
        self._pending_modules: list[weakref.ref] = []
        if module is not None and enabled:
            self.partition_module(module)

    # -- partitioning --------------------------------------------------------------------------------
    def partition_module(self, module: torch.nn.Module) -> None:
        pending = False
        for name, p in module.named_parameters(recurse=True):
            if hasattr(p, "ds3"):
                continue
            if getattr(p, "ds_pending_init", False):
                pending = True  # a child's: this module is recorded too (it names the parameter in errors)
            elif p.is_meta:  # built on the meta device: partitioned when its real values are registered
                p.ds_pending_init = True
                pending = True
            else:
                self._partition(p, name)
        if pending:
            self._pending_modules.append(weakref.ref(module))

    def _partition(self, p: torch.nn.Parameter, name: str, broadcast: bool = True) -> None:
        parts, rank = _world(self.group)
        full = p.detach().reshape(-1)
        if self.dtype is not None and full.is_floating_point():
            full = full.to(self.dtype)
        if parts > 1 and broadcast:
            full = full.contiguous().clone()
            comm.broadcast(full, _src(self.group, 0), group=self.group)
        numel = full.numel()
        shard_numel = -(-numel // parts) if numel else 0
        shard = torch.zeros(shard_numel, dtype=full.dtype, device=full.device)
        piece = full[rank * shard_numel : min((rank + 1) * shard_numel, numel)]
        shard[: piece.numel()].copy_(piece)
        if self.pin_memory:
            from ds_core.accelerator import get_accelerator

            shard = get_accelerator().pin_memory(shard)
        rec = Stage3Param(p, name, tuple(p.shape), numel, shard_numel, group=-1, shard_offset=-1,
                          init_shard=shard)
        p.ds3 = rec
        p.ds_init_group = self.group
        p.data = torch.empty(0, dtype=full.dtype, device=full.device)

    # -- parameters materialised after construction (meta-device builds) ---------------------------
    def _on_parameter_registered(self, module: torch.nn.Module, name: str, param: Any) -> None:
        """torch's global registration hook: a real tensor replacing a pending meta parameter."""
        if Init._active is not self or param is None or hasattr(param, "ds3") or param.is_meta:
            return
        old = module._parameters.get(name)
        if old is None or not getattr(old, "ds_pending_init", False):
            return
        if type(param) is not torch.nn.Parameter:
            raise ValueError(f"zero.Init: '{name}' of {type(module).__name__} is loaded as a "
                             f"{type(param).__name__}; only plain tensors can be partitioned (tensor-parallel "
                             "plans and quantized loading are not supported together with zero.Init)")
        if getattr(param, "_is_hf_initialized", False):
            # transformers' mark for a tensor read from the checkpoint: the same bytes on every rank
            self._partition(param, name, broadcast=False)
        else:  # the library fills it after registering (e.g. initializes a missing key): cut it on exit
            param.ds_pending_init = True

    def _finish_pending(self) -> None:
        """On exit: partition parameters that arrived whole after construction; refuse leftover meta ones."""
        seen: set[int] = set()
        for ref in self._pending_modules:
            module = ref()
            if module is None:
                continue
            for name, p in module._parameters.items():
                if p is None or hasattr(p, "ds3") or id(p) in seen:
                    continue
                seen.add(id(p))
                if p.is_meta:
                    raise RuntimeError(
                        f"zero.Init: parameter '{self._qualified(module, name)}' ({type(module).__name__}) is "
                        "still on the meta device when the context exits: it was never loaded (a device_map / disk offload, or a model "
                        "built on the meta device and not materialised, cannot be partitioned)")
                p.__dict__.pop("ds_pending_init", None)
                self._partition(p, name)
        self._pending_modules = []

    def _qualified(self, module: torch.nn.Module, name: str) -> str:
        """`name`'s dotted path from the outermost module built here (the last one constructed)."""
        for ref in reversed(self._pending_modules):
            root = ref()
            for prefix, sub in root.named_modules() if root is not None else ():
                if sub is module:
                    return f"{prefix}.{name}" if prefix else name
        return name

    # -- patching module constructors --------------------------------------------------------------------
    def __enter__(self) -> Init:
        if not self.enabled:
            return self
        if Init._active is not None:
            raise RuntimeError("zero.Init is already active; nesting is not supported")
        Init._active = self
        for cls in _all_module_classes():
            if "__init__" in cls.__dict__:
                original = cls.__dict__["__init__"]
                cls.__init__ = _wrap_init(original)
                self._patched.append((cls, original))
        self._watch_new_classes()
        self._registration_hook = torch.nn.modules.module.register_module_parameter_registration_hook(
            self._on_parameter_registered)
        self._saved_env = os.environ.get(_SYNC_LOAD_ENV)
        os.environ[_SYNC_LOAD_ENV] = "1"
        from ds_train.zero.hf_read_once_per_node import UnmappableReaders

        self._unmappable_readers = UnmappableReaders(self.group)
        self._unmappable_readers.install_available()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        try:
            if exc[0] is None:
                self._finish_pending()
        finally:
            self._unwatch_new_classes()
            for cls, original in reversed(self._patched):
                cls.__init__ = original
            self._patched = []
            if self._registration_hook is not None:
                self._registration_hook.remove()
                self._registration_hook = None
            if self._unmappable_readers is not None:
                self._unmappable_readers.undo()
                self._unmappable_readers = None
            if self._saved_env is None:
                os.environ.pop(_SYNC_LOAD_ENV, None)
            else:
                os.environ[_SYNC_LOAD_ENV] = self._saved_env
            self._pending_modules = []
            Init._active = None

    def _watch_new_classes(self) -> None:
        """Module classes defined inside the context (transformers imports a model's code lazily, from
        within `from_pretrained`) get their constructor wrapped as they are created."""
        self._had_init_subclass = "__init_subclass__" in torch.nn.Module.__dict__
        self._init_subclass = torch.nn.Module.__dict__.get("__init_subclass__")
        active = self

        def init_subclass(cls: type, **kwargs: Any) -> None:
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            if Init._active is active and "__init__" in cls.__dict__:
                original = cls.__dict__["__init__"]
                cls.__init__ = _wrap_init(original)
                active._patched.append((cls, original))

        torch.nn.Module.__init_subclass__ = classmethod(init_subclass)

    def _unwatch_new_classes(self) -> None:
        if self._had_init_subclass:
            torch.nn.Module.__init_subclass__ = self._init_subclass
        elif "__init_subclass__" in torch.nn.Module.__dict__:
            del torch.nn.Module.__init_subclass__


def _wrap_init(original: Any) -> Any:
    @functools.wraps(original)
    def init(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        depth = getattr(module, "_ds3_init_depth", 0)
        object.__setattr__(module, "_ds3_init_depth", depth + 1)
        try:
            original(module, *args, **kwargs)
        finally:
            object.__setattr__(module, "_ds3_init_depth", depth)
        active = Init._active
        if depth == 0 and active is not None:  # the outermost constructor of this object has finished
            active.partition_module(module)
            if active._unmappable_readers is not None:  # transformers' modeling code may have loaded meanwhile
                active._unmappable_readers.install_available()
    return init


def _all_module_classes() -> list[type]:
    out, stack, seen = [], [torch.nn.Module], set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


def _offloads_to_nvme(config: Any) -> bool:
    if config is None:
        return False
    from ds_train.config import load_train_config

    zc = load_train_config(config).zero_optimization
    return zc.offload_param is not None and zc.offload_param.device == "nvme"


def _config_dtype(config: Any) -> torch.dtype | None:
    if config is None:
        return None
    from ds_train.config import load_train_config

    cfg = load_train_config(config)
    if cfg.bf16_enabled:
        return torch.bfloat16
    if cfg.fp16_enabled:
        return torch.float16
    return torch.float32


def partition_whole_params(named: list[tuple[str, torch.nn.Parameter]], group: Any = None,
                           dtype: torch.dtype | None = None) -> None:
    """Cut whole parameters to zero.Init pieces after the fact (rank 0's values; a collective, in this order)."""
    cutter = Init(data_parallel_group=group, dtype=dtype)
    for name, p in named:
        cutter._partition(p, name)


# -- gathering ------------------------------------------------------------------------------------------
def gather_init_param(p: torch.nn.Parameter, group: Any = None) -> None:
    """Make a zero.Init parameter that no engine adopted whole again, for good (a collective)."""
    rec: Stage3Param = p.ds3
    p.data = _allgather_piece(rec.init_shard, rec, group)
    del p.ds3


def _allgather_piece(shard: torch.Tensor, rec: Stage3Param, group: Any) -> torch.Tensor:
    parts, _ = _world(group)
    if parts == 1:
        return shard[: rec.numel].clone().view(rec.shape)
    full = torch.empty(shard.numel() * parts, dtype=shard.dtype, device=shard.device)
    comm.all_gather_into_tensor(full, shard.contiguous(), group=group)
    return full[: rec.numel].view(rec.shape)


class GatheredParameters:
    """Whole parameters inside the block (a collective: every rank of the group enters it)."""

    def __init__(self, params: torch.nn.Parameter | Iterable[torch.nn.Parameter],
                 modifier_rank: int | None = None, fwd_module: Any = None, enabled: bool = True,
                 write_back: bool = True) -> None:
        if isinstance(params, torch.Tensor):
            params = [params]
        seen: set[int] = set()
        self.params = []
        for p in params:
            if hasattr(p, "ds3") and id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.modifier_rank = modifier_rank
        self.enabled = enabled and bool(self.params)
        self.write_back = write_back
        self._versions: dict[int, int] = {}

    def __enter__(self) -> None:
        if not self.enabled:
            return
        owned = [p for p in self.params if getattr(p, "ds_owner", None) is not None]
        by_owner: dict[int, tuple[Any, list[Stage3Param]]] = {}
        for p in owned:
            by_owner.setdefault(id(p.ds_owner), (p.ds_owner, []))[1].append(p.ds3)
        for owner, recs in by_owner.values():
            owner.gatherer.gather(recs)
        for p in self.params:
            rec = p.ds3
            if getattr(p, "ds_owner", None) is None:  # still zero.Init's piece
                full = _allgather_piece(rec.init_shard, rec, getattr(p, "ds_init_group", None))
                rec.full = full
                p.data = full
                rec.status = GATHERED
            rec.users += 1
            # a Parameter's version counter moves with in-place changes made through it (p.copy_,
            # state_dict()[k].copy_), not through p.data: those count as changes when modifier_rank=None
            self._versions[id(p)] = p._version

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        failed = exc[0] is not None
        for p in self.params:
            rec: Stage3Param = p.ds3
            rec.users -= 1
            owner = getattr(p, "ds_owner", None)
            group = owner.group if owner is not None else getattr(p, "ds_init_group", None)
            changed = False
            if not failed and self.modifier_rank is not None:
                parts, _ = _world(group)
                if parts > 1:
                    comm.broadcast(rec.full, _src(group, self.modifier_rank), group=group)
                changed = True
            elif not failed and self.write_back:
                changed = p._version != self._versions[id(p)]
            if owner is None:
                if changed:
                    _, rank = _world(group)
                    flat = rec.full.reshape(-1)
                    piece = flat[rank * rec.shard_numel : min((rank + 1) * rec.shard_numel, rec.numel)]
                    rec.init_shard.zero_()
                    rec.init_shard[: piece.numel()].copy_(piece)
                rec.full, rec.status = None, RELEASED
                p.data = torch.empty(0, dtype=rec.init_shard.dtype, device=rec.init_shard.device)
                continue
            if changed:
                owner.write_whole_param(rec)
            if rec.users <= 0:
                owner.gatherer.release(rec)
