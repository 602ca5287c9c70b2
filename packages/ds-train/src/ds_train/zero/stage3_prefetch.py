"""When ZeRO-3 parameters are gathered: module hooks, a recorded-order prefetcher, saved-tensor hooks.

- Forward: a module's pre-hook gathers its own parameters (one coalesced all-gather), its post-hook
  releases them. Backward: a hook on the module's outputs gathers them again before autograd enters
  the module; each parameter is released once its gradient has been accumulated.
- Prefetch: the order modules ran in is recorded (forward and backward separately). While the next
  step follows the same order, each hook also starts async gathers for the modules after it, up to
  `prefetch_bucket_size` elements ahead and `max_live_parameters` whole elements in all; with NVMe
  parameters the shards after that window are handed to the tier to read ahead (`read_ahead`). A change of
  order stops prefetching for the rest of that pass and records the new order. Every decision depends
  only on the order of hooks, which every rank sees identically, so the collectives match across ranks.
- Autograd saves parameters (or views of them) for backward. A saved-tensor pack hook replaces such a
  tensor by (parameter, view geometry), so the graph never keeps a whole parameter alive, and the
  unpack hook regathers it if needed: whatever order or reuse a model has, backward sees whole values.
- A parameter read by a module it does not belong to (a tied weight used through `F.linear`, a
  child's weight used by its parent) is caught by a torch-function mode during forward: it is
  gathered on the spot, released with the running module, and from then on gathered with that module.
- Modules marked as leaves (`set_z3_leaf_modules`, e.g. an MoE block whose experts run depending on
  the data) gather all their parameters at once, so no rank waits for a collective another skips.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ds_train.zero.stage3_params import GATHERED, ParamGatherer, Stage3Param

__all__ = ["FrozenRelease", "PrefetchCoordinator", "set_z3_leaf_modules"]

_LEAF_FLAG = "_ds3_leaf"


def set_z3_leaf_modules(model: torch.nn.Module, leaf_classes: list[type]) -> list[torch.nn.Module]:
    """Mark every module of a class in `leaf_classes`: ZeRO-3 gathers its whole subtree at once."""
    marked = []
    for m in model.modules():
        if isinstance(m, tuple(leaf_classes)):
            setattr(m, _LEAF_FLAG, True)
            marked.append(m)
    if not marked:
        raise ValueError(f"no module of {[c.__name__ for c in leaf_classes]} in the model")
    return marked


class _Trace:
    """The order of module events in one pass, and a replay cursor over the previous pass's order."""

    def __init__(self) -> None:
        self.previous: list[int] = []
        self.current: list[int] = []
        self.valid = False
        self.cursor = 0

    def start(self) -> None:
        if self.current:
            self.previous = self.current
        self.current = []
        self.valid = bool(self.previous)
        self.cursor = 0

    def record(self, key: int) -> int | None:
        """Record `key`; return the replay position after it, or None when the order diverged."""
        self.current.append(key)
        if not self.valid:
            return None
        if self.cursor < len(self.previous) and self.previous[self.cursor] == key:
            self.cursor += 1
            return self.cursor
        self.valid = False
        return None


class PrefetchCoordinator:
    """Installs the hooks on `model` and drives `gatherer` for the partitioned parameters."""

    def __init__(self, model: torch.nn.Module, gatherer: ParamGatherer, *, prefetch_bucket_size: int,
                 max_live_parameters: int, max_reuse_distance: int) -> None:
        self.gatherer = gatherer
        self.prefetch_bucket_size = prefetch_bucket_size
        self.max_live = max_live_parameters
        self.max_reuse = max_reuse_distance
        self.modules: list[torch.nn.Module] = []
        self.module_params: dict[int, list[Stage3Param]] = {}
        self._hooks: list[Any] = []
        self._leaf_children: set[int] = set()
        for m in model.modules():
            if id(m) in self._leaf_children:
                continue
            leaf = getattr(m, _LEAF_FLAG, False)
            params = m.parameters(recurse=leaf)
            recs = [p.ds3 for p in params if hasattr(p, "ds3")]
            if leaf:
                self._leaf_children.update(id(c) for c in m.modules() if c is not m)
            idx = len(self.modules)
            self.modules.append(m)
            self.module_params[idx] = _dedupe(recs)
            self._hooks.append(m.register_forward_pre_hook(self._make_pre(idx)))
            self._hooks.append(m.register_forward_hook(self._make_post(idx)))
        self.fwd = _Trace()
        self.bwd = _Trace()
        self.in_backward = False
        self._bwd_seen: set[int] = set()
        self.active = False
        self._running: list[int] = []  # modules whose forward is executing (innermost last)
        self._positions: list[int | None] = []  # their replay positions (None: order diverged)
        self._next_use: list[dict[int, int]] = []
        self._mode = _GatherOnUse(self)

    # -- pass boundaries ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def forward_pass(self) -> Iterator[None]:
        """Wraps one forward: the saved-tensor hooks are active, the forward trace restarts."""
        self.fwd.start()
        self._next_use = self._reuse_distances(self.fwd.previous) if self.fwd.valid and self.max_reuse > 0 else []
        self.active = True
        self._running, self._positions = [], []
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack), self._mode:
                yield
        finally:
            self.active = False

    def start_backward(self) -> None:
        self.bwd.start()
        self._bwd_seen = set()
        self.in_backward = True

    def end_backward(self) -> None:
        self.in_backward = False

    # -- hooks --------------------------------------------------------------------------------------
    def _make_pre(self, idx: int):
        def pre(module: torch.nn.Module, args: Any) -> None:
            # gather even outside the engine's forward (a direct model call); record order only inside
            recs = self.module_params[idx]
            position = self.fwd.record(idx) if self.active else None
            self.gatherer.gather(recs)
            for r in recs:
                r.users += 1
            if self.active:
                self._running.append(idx)
                self._positions.append(position)
            if position is not None:
                self._prefetch(self.fwd.previous, position)
        return pre

    def _make_post(self, idx: int):
        def post(module: torch.nn.Module, args: Any, output: Any) -> Any:
            recs = self.module_params[idx]
            position = None
            if self.active and self._running and self._running[-1] == idx:
                self._running.pop()
                position = self._positions.pop()
            for r in recs:
                r.users -= 1
            reuse = self._next_use[position - 1] if position is not None and self.fwd.valid and self._next_use \
                else {}
            for r in recs:
                if r.users <= 0 and reuse.get(id(r), self.max_reuse + 1) > self.max_reuse:
                    self.gatherer.release(r)
            if torch.is_grad_enabled() and recs:
                _register_output_hooks(output, lambda: self._pre_backward(idx))
            return output
        return post

    def _reuse_distances(self, order: list[int]) -> list[dict[int, int]]:
        """For each position of `order`: id(param) -> elements gathered before that param is used again.

        A parameter used again within max_reuse_distance (a tied embedding read by the output head, a
        module called twice) stays whole instead of being released and gathered a second time.
        """
        sizes = [sum(r.numel for r in self.module_params[key]) for key in order]
        prefix = [0]
        for n in sizes:
            prefix.append(prefix[-1] + n)
        out: list[dict[int, int]] = [{} for _ in order]
        next_pos: dict[int, int] = {}
        for pos in range(len(order) - 1, -1, -1):
            for r in self.module_params[order[pos]]:
                later = next_pos.get(id(r))
                if later is not None:
                    out[pos][id(r)] = prefix[later] - prefix[pos + 1]
                next_pos[id(r)] = pos
        return out

    def _pre_backward(self, idx: int) -> None:
        if idx in self._bwd_seen:
            return  # a module with several outputs: gather once per backward
        self._bwd_seen.add(idx)
        position = self.bwd.record(idx)
        self.gatherer.gather(self.module_params[idx])
        if position is not None:
            self._prefetch(self.bwd.previous, position)

    def _prefetch(self, order: list[int], position: int) -> None:
        budget = self.prefetch_bucket_size
        batch: list[Stage3Param] = []
        for key in order[position:]:
            for r in self.module_params[key]:
                if r.status != "released" or r in batch:
                    continue
                if self.gatherer.live_numel + r.numel > self.max_live or budget <= 0:
                    break
                batch.append(r)
                budget -= r.numel
            if budget <= 0:
                break
        if batch:
            self.gatherer.gather(batch, async_op=True)
        if self.gatherer.can_read_ahead:  # NVMe: the drive reads what comes after the prefetch window
            self.gatherer.read_ahead(self._upcoming(order, position))

    def _upcoming(self, order: list[int], position: int, limit: int = 64) -> list[Stage3Param]:
        """Released parameters of the modules after `position` in `order`, in order of first use."""
        out: list[Stage3Param] = []
        seen: set[int] = set()
        for key in order[position:]:
            for r in self.module_params[key]:
                if r.status == "released" and id(r) not in seen:
                    seen.add(id(r))
                    out.append(r)
            if len(out) >= limit:
                break
        return out

    def gather_on_use(self, rec: Stage3Param) -> None:
        """A partitioned parameter reached an op outside its own module: gather it for the running module."""
        self.gatherer.gather([rec])
        if self._running:
            idx = self._running[-1]
            if rec not in self.module_params[idx]:
                self.module_params[idx].append(rec)  # gathered up front (and prefetched) from now on
            rec.users += 1  # released with this module at its post-hook

    # -- saved tensors ------------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> Any:
        rec = self.gatherer.lookup(tensor)
        if rec is None:
            return tensor
        return (_SavedParam, rec, tensor.size(), tensor.stride(), tensor.storage_offset())

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple) and packed and packed[0] is _SavedParam:
            _, rec, size, stride, offset = packed
            if not rec.available:
                self.gatherer.gather([rec])
            return rec.full.as_strided(size, stride, offset)
        return packed

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class _SavedParam:
    """Marker for a saved tensor that is (a view of) a partitioned parameter."""


def _dedupe(recs: list[Stage3Param]) -> list[Stage3Param]:
    seen: set[int] = set()
    out = []
    for r in recs:
        if id(r) not in seen:
            seen.add(id(r))
            out.append(r)
    return out


def _register_output_hooks(output: Any, callback) -> None:
    """Call `callback` when the gradient of any tensor in `output` is about to flow into the module."""
    stack = [output]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.requires_grad and obj.grad_fn is not None:
                obj.register_hook(lambda grad: (callback(), None)[1])
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())


class _GatherOnUse(TorchFunctionMode):
    """During forward, gathers any partitioned parameter an op receives while it is not whole."""

    def __init__(self, coordinator: PrefetchCoordinator) -> None:
        super().__init__()
        self.coordinator = coordinator

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.coordinator.gatherer.busy:  # the gatherer's own ops (e.g. setting param.data)
            return func(*args, **kwargs)
        for a in args:
            self._check(a)
        for a in kwargs.values():
            self._check(a)
        return func(*args, **kwargs)

    def _check(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            rec = getattr(obj, "ds3", None)
            if rec is not None and rec.status != GATHERED:
                self.coordinator.gather_on_use(rec)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                if isinstance(item, torch.Tensor):
                    self._check(item)


class FrozenRelease:
    """Releases frozen weights (no gradient, so no gradient hook) once the backward that reads them is done.

    The signal is the gradient of a module's inputs, computed by the ops that read its weights. A
    module's list is read when it runs, so a frozen weight another module reads (a tied weight, gathered
    on use) is released with that module too. Without this, every frozen weight gathered for backward
    would stay whole until the backward ends (`after_backward`, still the fallback: a module whose
    inputs need no gradient).

    A leaf module (`set_z3_leaf_modules`) runs children depending on the data, so a regather of one of
    them would leave one rank in a collective another skips: its frozen weights are released only once
    the backward of every call of the leaf in this forward is complete (all of each call's input
    gradients), and kept whole when some call's inputs need no gradient.
    """

    def __init__(self, coordinator: PrefetchCoordinator, gatherer: ParamGatherer, frozen: list[Stage3Param]) -> None:
        self.coordinator, self.gatherer = coordinator, gatherer
        self.frozen = {id(r) for r in frozen if not r.persistent}
        self.pending: dict[int, int] = {}  # leaf index -> calls whose backward has not finished
        self.blocked: set[int] = set()  # leaves with a call whose end backward cannot observe
        self.hooks = [m.register_forward_hook(self._make_post(idx, getattr(m, _LEAF_FLAG, False)))
                      for idx, m in enumerate(coordinator.modules)]

    def _recs(self, idx: int) -> list[Stage3Param]:
        return [r for r in self.coordinator.module_params[idx] if id(r) in self.frozen]

    def _make_post(self, idx: int, leaf: bool):
        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled() or not self._recs(idx):
                return
            inputs = [a for a in _tensors(args) if a.requires_grad]
            if not leaf:
                if inputs:
                    recs = self._recs(idx)
                    torch.autograd.graph.register_multi_grad_hook(inputs, lambda _g: self._release(recs), mode="any")
                return
            if not inputs:
                self.blocked.add(idx)
                return
            self.pending[idx] = self.pending.get(idx, 0) + 1
            torch.autograd.graph.register_multi_grad_hook(inputs, lambda _g: self._leaf_done(idx), mode="all")
        return post

    def _leaf_done(self, idx: int) -> None:
        self.pending[idx] -= 1
        if self.pending[idx] == 0 and idx not in self.blocked:
            self._release(self._recs(idx))

    def _release(self, recs: list[Stage3Param]) -> None:
        for r in recs:
            if r.users <= 0:
                self.gatherer.release(r)

    def end_backward(self) -> None:
        self.pending.clear()
        self.blocked.clear()


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in a module's positional arguments (nested in lists, tuples and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
