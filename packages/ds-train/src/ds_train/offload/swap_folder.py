"""One rank's NVMe swap folder: files written and read through ds-kernels' aio, failures made explicit.

Swap files hold only live training state; checkpoints are written elsewhere by the engine, so a
swap failure (disk full, folder removed, I/O error) never touches the last checkpoint. Each failure
raises `NvmeSwapError` naming the file, the errno and what to do.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["SwapFolder", "NvmeSwapError", "return_freed_buffers_to_os"]


class NvmeSwapError(RuntimeError):
    """A swap file could not be written or read (the message says which, why, and how to recover)."""


class SwapFolder:
    """`root/zero_swap_rank{rank}`: created fresh (old contents removed) when the strategy starts."""

    def __init__(self, root: str, rank: int, *, block_size: int = 1 << 20, queue_depth: int = 8,
                 threads: int = 1, engine: str = "auto") -> None:
        from ds_kernels.aio import AsyncIO

        if not root:
            raise ValueError("NVMe offload needs nvme_path (a folder on the drive to swap to)")
        self.root = Path(root)
        if not self.root.is_dir():
            raise NvmeSwapError(f"nvme_path '{root}' is not an existing folder; create it (on the NVMe drive) first")
        self.dir = self.root / f"zero_swap_rank{rank}"
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.aio = AsyncIO(block_size=block_size, queue_depth=queue_depth, threads=threads, engine=engine)
        return_freed_buffers_to_os()
        self.wait_seconds = 0.0  # time the training thread spent blocked on I/O
        self.bytes_read = 0
        self.bytes_written = 0

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, tensor: torch.Tensor, name: str, offset_bytes: int = 0) -> Any:
        self.bytes_written += tensor.numel() * tensor.element_size()
        return self._submit("write", tensor, name, offset_bytes)

    def read(self, tensor: torch.Tensor, name: str, offset_bytes: int = 0) -> Any:
        self.bytes_read += tensor.numel() * tensor.element_size()
        return self._submit("read", tensor, name, offset_bytes)

    def _submit(self, op: str, tensor: torch.Tensor, name: str, offset_bytes: int) -> Any:
        try:
            return self.aio.submit_write(tensor, self.path(name), offset_bytes) if op == "write" \
                else self.aio.submit_read(tensor, self.path(name), offset_bytes)
        except OSError as exc:
            raise self._error(op, exc) from exc

    def wait(self, request: Any | None) -> None:
        if request is None:
            return
        start = time.perf_counter()
        try:
            request.wait()
        except OSError as exc:
            raise self._error(request.op, exc) from exc
        finally:
            self.wait_seconds += time.perf_counter() - start

    def _error(self, op: str, exc: OSError) -> NvmeSwapError:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return NvmeSwapError(
            f"NVMe offload: {op} of swap file {exc.filename or self.dir} failed: {reason} (errno {exc.errno}). "
            f"The swap folder {self.dir} is full, was removed or is failing; this run's state since the last "
            "checkpoint is lost, the checkpoint itself is untouched: free space / restore the folder and "
            "resume with load_checkpoint()."
        )

    def close(self, remove: bool = True) -> None:
        try:
            self.aio.close()  # waits for outstanding requests
        except OSError:
            pass  # the folder is already broken; the error was reported when it happened
        if remove and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def return_freed_buffers_to_os() -> None:
    """Pin glibc's mmap threshold at 1 MiB so freed multi-MB buffers (gathered parameters, staging)
    go back to the OS at once. glibc otherwise raises the threshold after the first free of such a
    buffer and keeps later ones in the heap, and the resident set grows far past the live tensors,
    which would defeat the point of NVMe offload. No effect where glibc is not the allocator."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass
