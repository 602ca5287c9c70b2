"""Checkpoints that cannot be memory-mapped, under `zero.Init`: read whole once per node, not once per rank.

transformers' `from_pretrained` memory-maps safetensors and zip-format `.bin` files: their tensors stay
pages of the file, shared by every rank of a node. Two formats it reads whole into private memory
instead: a `.bin` in torch's legacy (pre-1.6, non-zip) format, which `torch.load` cannot map, and a
GGUF file of an architecture transformers does not keep packed, whose tensors it dequantizes and
copies (`load_gguf_checkpoint(return_tensors=True)`). Under `zero.Init` every rank therefore held the
whole model for a while, which is what `zero.Init` exists to avoid.

While `zero.Init` is active, those two readers of transformers are routed through here (`UnmappableReaders`):
one rank per node (the lowest rank of the group on that host) reads the file as transformers does and
writes the resulting tensors in torch's zip format to a temporary file (under `TMPDIR`, written
atomically); every rank of the node then memory-maps that copy, and the copy is unlinked once all have
mapped it (the mapping keeps its pages until loading ends). Peak private memory: the reading rank holds
the whole (for GGUF: dequantized) model once, as before; every other rank holds only its pieces. Disk:
one temporary copy per node, for the length of the load (dequantized size for GGUF). Other files,
shape-only (`meta`) reads and a world of one go through transformers' readers unchanged.
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from ds_core import comm

__all__ = ["UnmappableReaders", "is_legacy_torch_file"]


def is_legacy_torch_file(path: str) -> bool:
    """A torch.save file in the pre-1.6 (non-zip) format, which torch.load cannot memory-map."""
    return (os.path.isfile(path) and not path.endswith((".safetensors", ".gguf"))
            and not zipfile.is_zipfile(path))


class UnmappableReaders:
    """The once-per-node readers, put into transformers' modules while zero.Init is active.

    Nothing is imported for them: `install_available()` (called on entering zero.Init and after each
    module constructor inside it) patches the reader of a transformers module once that module is loaded
    (importing transformers' modeling code costs ~90 MB, which a zero.Init of a plain torch model must
    not pay). transformers' modeling code is loaded before a model is built, and the GGUF quantizer
    before its file is read; both readers are called after the model is built, so they are in place.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.enabled = comm.is_initialized() and comm.get_world_size(group) > 1
        self._installed: list[tuple[Any, str, Any, Any]] = []  # (module, name, original, replacement)
        self._pending = ["bin", "gguf"]

    def install_available(self) -> None:
        if not self.enabled or not self._pending:
            return
        if "bin" in self._pending and "transformers.modeling_utils" in sys.modules:
            utils = sys.modules["transformers.modeling_utils"]
            if hasattr(utils, "load_state_dict"):
                self._patch(utils, "load_state_dict", _legacy_bin_reader(utils, self.group))
            self._pending.remove("bin")
        if "gguf" in self._pending and "transformers.quantizers.quantizer_gguf" in sys.modules:
            # a GGUF load is under way: its reader's module is small (~4 MB) and imported here if needed
            gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
            self._patch(gguf_utils, "load_gguf_checkpoint", _gguf_reader(gguf_utils.load_gguf_checkpoint, self.group))
            self._pending.remove("gguf")

    def _patch(self, module: Any, name: str, replacement: Any) -> None:
        self._installed.append((module, name, getattr(module, name), replacement))
        setattr(module, name, replacement)

    def undo(self) -> None:
        for module, name, original, replacement in reversed(self._installed):
            if getattr(module, name) is replacement:
                setattr(module, name, original)
        self._installed = []
        self._pending = []


def _legacy_bin_reader(utils: Any, group: Any) -> Callable[..., dict[str, torch.Tensor]]:
    original = utils.load_state_dict

    def load_state_dict(checkpoint_file: Any, map_location: Any = "cpu", weights_only: bool = True,
                        disable_mmap: bool | None = None) -> dict[str, torch.Tensor]:
        path = os.fspath(checkpoint_file)
        if str(map_location) == "meta" or not is_legacy_torch_file(path):
            return original(checkpoint_file, map_location=map_location, weights_only=weights_only,
                            disable_mmap=disable_mmap)
        if weights_only and hasattr(utils, "check_torch_load_is_safe"):
            utils.check_torch_load_is_safe()  # transformers' guard, before the untrusted file is unpickled
        copy, wrote = _zip_copy_once_per_node(
            path, lambda: torch.load(path, map_location="cpu", weights_only=weights_only), group)
        try:  # transformers' own reader on the zip copy: torch.load(mmap=True)
            return original(copy, map_location=map_location, weights_only=weights_only, disable_mmap=disable_mmap)
        finally:
            _release(copy, wrote, group)
    return load_state_dict


def _gguf_reader(original: Callable[..., dict], group: Any) -> Callable[..., dict]:
    def load_gguf_checkpoint(gguf_checkpoint_path: Any, return_tensors: bool = False, model_to_load: Any = None,
                             torch_dtype: Any = None) -> dict:
        if not return_tensors:  # metadata only (config, tokenizer): small, every rank reads it
            return original(gguf_checkpoint_path, return_tensors=False, model_to_load=model_to_load,
                            torch_dtype=torch_dtype)
        path = os.fspath(gguf_checkpoint_path)
        copy, wrote = _zip_copy_once_per_node(
            path, lambda: original(path, return_tensors=True, model_to_load=model_to_load,
                                   torch_dtype=torch_dtype)["tensors"], group)
        try:
            parsed = original(path, return_tensors=False, model_to_load=model_to_load, torch_dtype=torch_dtype)
            parsed["tensors"] = torch.load(copy, map_location="cpu", weights_only=True, mmap=True)
            return parsed
        finally:
            _release(copy, wrote, group)
    return load_gguf_checkpoint


def _release(copy: str, wrote: bool, group: Any) -> None:
    comm.barrier(group)  # every rank of the node has mapped the copy
    if wrote:
        os.unlink(copy)


def _zip_copy_once_per_node(path: str, read: Callable[[], dict[str, torch.Tensor]],
                            group: Any) -> tuple[str, bool]:
    """The path of a zip-format copy of `read()` that this node's ranks can map; True where this rank wrote it."""
    parts, rank = comm.get_world_size(group), comm.get_rank(group)
    hosts: list[Any] = [None] * parts
    comm.all_gather_object(hosts, socket.gethostname(), group=group)
    writer = hosts.index(hosts[rank]) == rank  # the lowest rank of the group on this host
    box = [os.path.join(tempfile.gettempdir(), f"ds_train_checkpoint_{uuid.uuid4().hex}.pt") if rank == 0 else None]
    comm.broadcast_object_list(box, comm.get_global_rank(group, 0) if group is not None else 0, group=group)
    copy = box[0]
    failure = None
    if writer:
        partial = f"{copy}.partial"
        try:
            state = read()
            torch.save(state, partial)  # the zip format: torch.load(mmap=True) maps it
            del state
            os.replace(partial, copy)
        except Exception as exc:  # every rank must hear of it, or the others would wait for the copy
            failure = f"{type(exc).__name__}: {exc}"
            if os.path.exists(partial):
                os.unlink(partial)
    failures: list[Any] = [None] * parts
    comm.all_gather_object(failures, failure, group=group)
    bad = [(r, f) for r, f in enumerate(failures) if f]
    if bad:
        if writer and failure is None:
            os.unlink(copy)
        r, message = bad[0]
        raise RuntimeError(f"zero.Init: rank {r} could not read the checkpoint {path} and write its memory-mappable "
                           f"copy under {os.path.dirname(copy)} (set TMPDIR to a folder with room): {message}")
    return copy, writer
