"""Atomic, collective checkpoint saving.

Every rank writes its files into ``<dir>/.tmp-<tag>``; after a barrier rank 0 writes the manifest
(with each file's size and CRC32), renames the directory to ``<dir>/<tag>`` and only then rewrites
``latest``. A crash at any point leaves the previous checkpoint and ``latest`` untouched.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from ds_core import comm
from ds_core.logging import log_dist
from safetensors.torch import save as safetensors_save

from ds_train.checkpoint.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    MODEL_FILE,
    CheckpointError,
    fsync_dir,
    shard_file,
    write_file_durable,
)
from ds_train.zero.strategy import ZeroStrategy

__all__ = ["write_checkpoint", "check_json"]


def check_json(value: Any, where: str) -> None:
    """Fail before anything is written if `value` cannot be stored as JSON."""
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{where} must be JSON-serializable (ds-train checkpoints never pickle): {exc}"
        ) from None


def _barrier(group: Any) -> None:
    if comm.is_initialized() and comm.get_world_size(group) > 1:
        comm.barrier(group)


def _module_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with shared tensors stored once; returns (tensors, alias -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if t is None:
            continue
        key = id(t)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous().clone()  # clone: params are views of one flat buffer
    return tensors, aliases


def _gather_objects(obj: Any, group: Any) -> list[Any]:
    if not comm.is_initialized() or comm.get_world_size(group) == 1:
        return [obj]
    out: list[Any] = [None] * comm.get_world_size(group)
    comm.all_gather_object(out, obj, group=group)
    return out


def write_checkpoint(
    save_dir: str,
    tag: str,
    *,
    strategy: ZeroStrategy,
    module: torch.nn.Module,
    engine_state: dict[str, Any],
    client_state: dict[str, Any],
    save_latest: bool = True,
    tag_validation: str = "Warn",
    group: Any = None,
) -> Path:
    """Save one checkpoint collectively; every rank must call it with the same tag."""
    check_json(client_state, "client_state")
    check_json(engine_state, "engine state")
    if not tag or "/" in tag or tag.startswith("."):
        raise CheckpointError(f"invalid checkpoint tag {tag!r}: use a plain, non-hidden directory name")
    rank = comm.get_rank(group) if comm.is_initialized() else 0
    tags = _gather_objects(tag, group)
    if len(set(tags)) > 1:
        msg = f"ranks disagree on the checkpoint tag: {tags}"
        if tag_validation.lower() == "fail":
            raise CheckpointError(msg)
        if tag_validation.lower() == "warn":
            log_dist(msg, ranks=[0])
    root = Path(save_dir)
    final, tmp = root / tag, root / f".tmp-{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save
        tmp.mkdir()
    _barrier(group)

    files: dict[str, dict[str, Any]] = {}
    index = strategy.shard_index()
    metas = None
    if index is not None:
        tensors, metas = strategy.shard_state()
        name = shard_file(index)
        files[name] = write_file_durable(tmp / name, safetensors_save(tensors, metadata={"shard": str(index)}))
    with strategy.gathered_params():  # ZeRO-3: whole weights for the module file (a collective)
        if rank == 0:
            tensors, aliases = _module_tensors(module)
            files[MODEL_FILE] = write_file_durable(tmp / MODEL_FILE, safetensors_save(tensors))
    all_files = _gather_objects(files, group)
    all_metas = _gather_objects(metas, group)
    if rank == 0:
        merged: dict[str, dict[str, Any]] = {}
        for f in all_files:
            merged.update(f)
        group_meta = next(m for m in all_metas if m is not None)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "tag": tag,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "zero_stage": strategy.stage,
            "shards": max((layout.parts for layout in strategy.layouts()), default=1),
            "layouts": [layout.to_json() for layout in strategy.layouts()],
            "group_meta": group_meta,
            "module_aliases": aliases,
            "engine": engine_state,
            "client_state": client_state,
            "files": merged,
        }
        write_file_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
        fsync_dir(tmp)
        old = root / f".old-{tag}"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if save_latest:
            latest_tmp = root / f".{LATEST}.tmp"
            write_file_durable(latest_tmp, tag.encode("utf-8"))
            os.replace(latest_tmp, root / LATEST)
            fsync_dir(root)
    _barrier(group)
    return final
