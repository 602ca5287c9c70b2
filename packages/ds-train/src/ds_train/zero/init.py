"""`zero.Init` (build a model already partitioned) and `GatheredParameters` (whole parameters for a while).

Under `Init`, every `torch.nn.Module` constructor is wrapped: once a module's own `__init__` has run,
each parameter it created is broadcast from rank 0 (so every rank holds the same initial values),
cut to this rank's piece and its storage dropped. The whole model therefore never exists in one
process; only the parameters of the module being built do, for a moment. The ZeRO-3 strategy later
adopts these pieces as they are.

`GatheredParameters(params, modifier_rank=r)` all-gathers parameters on every rank; on exit, rank r's
values are broadcast and written back into the shards (and the fp32 master copy when an engine owns
the parameters). With `modifier_rank=None`, in-place changes are written back only if made (every
rank must then make the same change).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from ds_core import comm

from ds_train.zero.stage3_params import GATHERED, RELEASED, Stage3Param

__all__ = ["Init", "GatheredParameters", "gather_init_param"]


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
        if module is not None and enabled:
            self.partition_module(module)

    # -- partitioning --------------------------------------------------------------------------------
    def partition_module(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters(recurse=True):
            if not hasattr(p, "ds3"):
                self._partition(p, name)

    def _partition(self, p: torch.nn.Parameter, name: str) -> None:
        parts, rank = _world(self.group)
        full = p.detach().reshape(-1)
        if self.dtype is not None and full.is_floating_point():
            full = full.to(self.dtype)
        if parts > 1:
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
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        for cls, original in reversed(self._patched):
            cls.__init__ = original
        self._patched = []
        Init._active = None


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
