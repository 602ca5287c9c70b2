"""Old (non-zip) `pytorch_model.bin` files under `zero.Init`: read whole once per node, not once per rank.

transformers' `from_pretrained` reads a `.bin` with `torch.load(mmap=True)` when it is a zip archive
(torch's format since 1.6): its tensors stay pages of the file, shared by every rank of a node. A file in
the legacy format cannot be memory-mapped: `torch.load` reads it whole into private memory, so under
`zero.Init` every rank held the whole model for a while, which is what `zero.Init` exists to avoid.

While `zero.Init` is active (and transformers is imported), transformers' checkpoint reader is routed
through `read_legacy_once_per_node`: for a legacy file, one rank per node (the lowest rank of the group
on that host) reads it and writes it back in the zip format to a temporary file (under `TMPDIR`, written
atomically), every rank of the node then memory-maps that copy through transformers' own reader, and
the copy is unlinked once all have mapped it (the mapping keeps its pages until loading ends). Peak
private memory: the reading rank holds the whole file once (torch cannot read the legacy format in
pieces); every other rank holds only its pieces. Disk: one temporary copy per node, for the length of
the load. Zip-format `.bin`, safetensors and GGUF files, shape-only (`meta`) reads and a world of one
go through the reader unchanged.
"""
from __future__ import annotations

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

__all__ = ["route_legacy_bin_reads", "is_legacy_torch_file"]


def is_legacy_torch_file(path: str) -> bool:
    """A torch.save file in the pre-1.6 (non-zip) format, which torch.load cannot memory-map."""
    return (os.path.isfile(path) and not path.endswith((".safetensors", ".gguf"))
            and not zipfile.is_zipfile(path))


def route_legacy_bin_reads(group: Any) -> Callable[[], None]:
    """Install the once-per-node reader into transformers (if imported); returns the function that undoes it."""
    utils = sys.modules.get("transformers.modeling_utils")
    original = getattr(utils, "load_state_dict", None)
    if original is None or not comm.is_initialized() or comm.get_world_size(group) == 1:
        return lambda: None

    def load_state_dict(checkpoint_file: Any, map_location: Any = "cpu", weights_only: bool = True,
                        disable_mmap: bool | None = None) -> dict[str, torch.Tensor]:
        path = os.fspath(checkpoint_file)
        if str(map_location) == "meta" or not is_legacy_torch_file(path):
            return original(checkpoint_file, map_location=map_location, weights_only=weights_only,
                            disable_mmap=disable_mmap)
        if weights_only and hasattr(utils, "check_torch_load_is_safe"):
            utils.check_torch_load_is_safe()  # transformers' guard, before the untrusted file is unpickled
        copy, wrote = _zip_copy_once_per_node(path, weights_only, group)
        try:
            return original(copy, map_location=map_location, weights_only=weights_only, disable_mmap=disable_mmap)
        finally:
            comm.barrier(group)  # every rank of the node has mapped the copy
            if wrote:
                os.unlink(copy)

    utils.load_state_dict = load_state_dict

    def undo() -> None:
        if utils.load_state_dict is load_state_dict:
            utils.load_state_dict = original
    return undo


def _zip_copy_once_per_node(path: str, weights_only: bool, group: Any) -> tuple[str, bool]:
    """The path of a zip-format copy of `path` that this node's ranks can map; True where this rank wrote it."""
    parts, rank = comm.get_world_size(group), comm.get_rank(group)
    hosts: list[Any] = [None] * parts
    comm.all_gather_object(hosts, socket.gethostname(), group=group)
    writer = hosts.index(hosts[rank]) == rank  # the lowest rank of the group on this host
    box = [os.path.join(tempfile.gettempdir(), f"ds_train_legacy_bin_{uuid.uuid4().hex}.pt") if rank == 0 else None]
    comm.broadcast_object_list(box, comm.get_global_rank(group, 0) if group is not None else 0, group=group)
    copy = box[0]
    failure = None
    if writer:
        partial = f"{copy}.partial"
        try:
            state = torch.load(path, map_location="cpu", weights_only=weights_only)
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
        raise RuntimeError(f"zero.Init: rank {r} could not read the legacy-format checkpoint {path} and write its "
                           f"memory-mappable copy under {os.path.dirname(copy)} (set TMPDIR to a folder with room): "
                           f"{message}")
    return copy, writer
