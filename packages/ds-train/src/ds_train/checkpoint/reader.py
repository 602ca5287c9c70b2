"""Loading and verifying a checkpoint; regathering shards saved by any number of ranks.

Every file listed in the manifest must exist with its recorded size and CRC32 before anything is
loaded, so a partial or corrupted checkpoint fails with one error naming the file and leaves the
engine as it was. Shards are read lazily (safetensors `safe_open`), one state key at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ds_train.checkpoint.format import (
    MODEL_FILE,
    CheckpointError,
    crc32_of_file,
    load_manifest,
    resolve_tag,
    shard_file,
)
from ds_train.zero.partition import GroupLayout
from ds_train.zero.strategy import ShardReader

__all__ = ["CheckpointReader"]


class CheckpointReader(ShardReader):
    """One verified checkpoint tag; `full_tensors` rebuilds whole parameters from every shard."""

    def __init__(self, load_dir: str, tag: str | None = None, verify: bool = True) -> None:
        root = Path(load_dir)
        resolved = resolve_tag(root, tag)
        if resolved is None:
            raise CheckpointError(f"no checkpoint tag given and {root / 'latest'} does not exist")
        self.tag = resolved
        self.path = root / resolved
        self.manifest = load_manifest(self.path)
        self.layouts = [GroupLayout.from_json(d) for d in self.manifest["layouts"]]
        self.shards = int(self.manifest["shards"])
        if verify:
            self.verify()

    # -- integrity ----------------------------------------------------------------------------------
    def verify(self) -> None:
        files = self.manifest.get("files", {})
        expected = {MODEL_FILE} | {shard_file(i) for i in range(self.shards)}
        missing_entries = sorted(expected - set(files))
        if missing_entries:
            raise CheckpointError(f"{self.path}: manifest lists no entry for {missing_entries}; the checkpoint is partial")
        for name, info in files.items():
            path = self.path / name
            if not path.is_file():
                raise CheckpointError(f"{self.path}: file {name} is missing; the checkpoint is partial")
            size = path.stat().st_size
            if size != info["size"]:
                raise CheckpointError(
                    f"{path}: size {size} bytes, manifest says {info['size']}; the file is truncated or corrupt"
                )
            if crc32_of_file(path) != info["crc32"]:
                raise CheckpointError(f"{path}: CRC32 mismatch; the file is corrupt")

    # -- module --------------------------------------------------------------------------------------
    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved module state dict, shared tensors under every name they had."""
        try:
            tensors = load_file(str(self.path / MODEL_FILE))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.path / MODEL_FILE}: cannot read ({exc})") from None
        for alias, name in self.manifest.get("module_aliases", {}).items():
            tensors[alias] = tensors[name]
        return tensors

    @property
    def engine_state(self) -> dict[str, Any]:
        return self.manifest.get("engine", {})

    @property
    def client_state(self) -> dict[str, Any]:
        return self.manifest.get("client_state", {})

    # -- ShardReader ----------------------------------------------------------------------------------
    def group_count(self) -> int:
        return len(self.layouts)

    def param_names(self, group: int) -> list[str]:
        return [s.name for s in self.layouts[group].slots]

    def group_meta(self, group: int) -> dict[str, Any]:
        return self.manifest["group_meta"][group]

    def state_keys(self, group: int) -> list[str]:
        return ["fp32", *self.group_meta(group).get("state_keys", [])]

    def full_tensors(self, group: int, key: str) -> dict[str, torch.Tensor]:
        layout = self.layouts[group]
        flat = [torch.zeros(s.numel, dtype=torch.float32) for s in layout.slots]
        name = f"g{group}.{key}"
        for part in range(self.shards):
            path = self.path / shard_file(part)
            try:
                with safe_open(str(path), framework="pt") as f:
                    if name not in f.keys():
                        raise CheckpointError(f"{path}: tensor '{name}' is missing")
                    shard = f.get_tensor(name)
            except SafetensorError as exc:
                raise CheckpointError(f"{path}: cannot read ({exc})") from None
            if shard.numel() != layout.shard_numel:
                raise CheckpointError(f"{path}: '{name}' has {shard.numel()} elements, layout says {layout.shard_numel}")
            for piece in layout.pieces(part):
                flat[piece.param][piece.param_offset : piece.param_offset + piece.length] = \
                    shard[piece.shard_offset : piece.shard_offset + piece.length]
        return {s.name: t.view(s.shape) for s, t in zip(layout.slots, flat)}
