"""The on-disk format, in one place.

    <dir>/latest                                      the newest complete tag (written last)
    <dir>/<tag>/manifest.json                         metadata, the file list with sizes and CRC32s
    <dir>/<tag>/model_states.safetensors              the module's state dict in its training dtype
    <dir>/<tag>/zero_pp_rank_<r>_mp_rank_00_optim_states.safetensors
                                                      shard r: fp32 master weights + optimizer state
    <dir>/<tag>/client_state.json is inside manifest.json ("client_state")

Nothing is pickled: tensors are safetensors, everything else JSON, so loading runs no code.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "MODEL_FILE", "LATEST", "CheckpointError",
    "shard_file", "crc32_of_file", "fsync_dir", "write_file_durable", "read_latest", "resolve_tag", "load_manifest",
]

FORMAT_NAME = "ds-train-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model_states.safetensors"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial, corrupt or does not match the model."""


def shard_file(index: int) -> str:
    return f"zero_pp_rank_{index}_mp_rank_00_optim_states.safetensors"


def crc32_of_file(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_durable(path: Path, data: bytes) -> dict[str, Any]:
    """Write, flush and fsync `data`; return its size and CRC32 for the manifest."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "crc32": zlib.crc32(data)}


def read_latest(directory: Path) -> str | None:
    path = Path(directory) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(encoding="utf-8").strip()
    return tag or None


def resolve_tag(directory: Path, tag: str | None) -> str | None:
    return tag if tag is not None else read_latest(directory)


def load_manifest(tag_dir: Path) -> dict[str, Any]:
    path = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {tag_dir}")
    if not path.is_file():
        raise CheckpointError(
            f"{tag_dir} has no {MANIFEST}: not a ds-train checkpoint, or a save that did not finish"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt (invalid JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')} is not supported "
                              f"(this ds-train reads version {FORMAT_VERSION})")
    return manifest
