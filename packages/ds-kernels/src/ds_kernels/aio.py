"""Asynchronous tensor file I/O for NVMe offload: O_DIRECT, aligned buffers, a queue depth, worker threads.

`AsyncIO.submit_write/submit_read` split a tensor's bytes into `block_size` blocks, queue them to the
engine and return a `Request` at once, so compute overlaps the transfer. The engine is picked at run
time: the compiled one ('io_uring' when the kernel allows it, else 'threads': a C++ pool doing
pread/pwrite) or, without the extension, 'python-threads'. `Request.wait()` raises an OSError subclass
naming the file on a missing file, ENOSPC, EIO or a short transfer; a request that failed is never
reported as done.

O_DIRECT is used for the blocks whose memory, file offset and length are 4 KiB aligned (tensors from
`aligned_empty` are); the rest go through the page cache, so any tensor and offset work.
"""

from __future__ import annotations

import errno as errno_mod
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from ds_core.logging import warn_once

from ds_kernels import _loader

__all__ = ["AsyncIO", "Request", "aligned_empty", "available", "engines"]

PathLike = str | os.PathLike
_ENGINES = ("auto", "io_uring", "threads", "python-threads")


def available() -> bool:
    """True when the compiled I/O engine is loaded."""
    ext = _loader.extension()
    return ext is not None and hasattr(ext, "AioEngine")


def engines() -> list[str]:
    """The engines that can run in this process, best first."""
    names = []
    ext = _loader.extension()
    if ext is not None and hasattr(ext, "AioEngine"):
        if ext.io_uring_supported():
            names.append("io_uring")
        names.append("threads")
    names.append("python-threads")
    return names


def aligned_empty(numel: int, dtype: torch.dtype = torch.uint8, alignment: int = 4096) -> torch.Tensor:
    """An uninitialized 1-D host tensor whose data_ptr is a multiple of `alignment` (for O_DIRECT)."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(numel * itemsize + alignment, dtype=torch.uint8)
    shift = (-raw.data_ptr()) % alignment
    return raw[shift : shift + numel * itemsize].view(dtype)


def _check_tensor(tensor: torch.Tensor, offset: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(
            f"aio works on host tensors; got one on {tensor.device} (copy it to pinned CPU memory)"
        )
    if not tensor.is_contiguous():
        raise ValueError("aio needs a contiguous tensor")
    if offset < 0:
        raise ValueError(f"file offset must be >= 0, got {offset}")


class Request:
    """A submitted transfer. `wait()` blocks until every block is done and raises if any failed."""

    def __init__(self, path: str, op: str, nbytes: int, waiter, poller, tensor: torch.Tensor) -> None:
        self.path, self.op, self.nbytes = path, op, nbytes
        self._waiter, self._poller = waiter, poller
        self._tensor = tensor  # keeps the memory alive while the engine writes into / reads from it
        self._result: tuple[int, str] | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            if self._result is None:
                self._result = self._waiter()
                self._tensor = None
        err, message = self._result
        if err != 0:
            raise OSError(err, f"aio {self.op} of {self.nbytes} bytes failed: {message}", self.path)

    def done(self) -> bool:
        """True once the transfer has finished (successfully or not); never blocks. wait() reports errors."""
        return self._result is not None or self._poller()


class AsyncIO:
    """Submit/wait tensor I/O. `engine`: 'auto', 'io_uring', 'threads' or 'python-threads'."""

    def __init__(
        self, block_size: int = 1 << 20, queue_depth: int = 32, threads: int = 4, engine: str = "auto"
    ) -> None:
        if engine not in _ENGINES:
            raise ValueError(f"unknown aio engine {engine!r}; choose one of {', '.join(_ENGINES)}")
        if block_size <= 0 or block_size % 4096:
            raise ValueError(f"block_size must be a positive multiple of 4096, got {block_size}")
        if queue_depth < 1 or threads < 1:
            raise ValueError(f"queue_depth and threads must be >= 1, got {queue_depth} and {threads}")
        possible = engines()
        if engine == "auto":
            engine = possible[0]
            if engine == "python-threads":
                _loader.fallback_warning("aio")
        elif engine not in possible:
            reason = _loader.load_error() or "not supported by this kernel"
            raise RuntimeError(f"aio engine {engine!r} is unavailable here ({reason}); available: {possible}")
        self.engine = engine
        self.block_size, self.queue_depth, self.threads = block_size, queue_depth, threads
        self._pending: list[Request] = []
        if engine == "python-threads":
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ds-aio")
            self._native = None
        else:
            self._pool = None
            self._native = _loader.extension().AioEngine(block_size, queue_depth, threads, engine)

    def submit_write(self, tensor: torch.Tensor, path: PathLike, offset: int = 0) -> Request:
        """Start writing `tensor`'s bytes to `path` at `offset` (the file is created, never truncated)."""
        return self._submit("write", tensor, path, offset)

    def submit_read(self, tensor: torch.Tensor, path: PathLike, offset: int = 0) -> Request:
        """Start filling `tensor` from `path` at `offset`; a file too short is an error."""
        return self._submit("read", tensor, path, offset)

    def wait_all(self) -> None:
        """Wait for every outstanding request; raises the first error after all have finished."""
        pending, self._pending = self._pending, []
        first: OSError | None = None
        for req in pending:
            try:
                req.wait()
            except OSError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _submit(self, op: str, tensor: torch.Tensor, path: PathLike, offset: int) -> Request:
        _check_tensor(tensor, offset)
        path = os.fspath(path)
        nbytes = tensor.numel() * tensor.element_size()
        self._pending = [r for r in self._pending if r._result is None]  # drop the ones already waited
        if self._native is not None:
            rid = self._native.submit(op == "write", tensor.data_ptr(), nbytes, path, offset)
            native = self._native
            req = Request(path, op, nbytes, lambda: native.wait(rid), lambda: native.poll(rid), tensor)
        else:
            fut = self._pool.submit(_python_transfer, op, tensor, path, offset, self.block_size)
            req = Request(path, op, nbytes, lambda: _future_result(fut), fut.done, tensor)
        self._pending.append(req)
        return req

    def close(self) -> None:
        self.wait_all()
        if self._pool is not None:
            self._pool.shutdown()

    def __del__(self) -> None:
        # In-flight transfers hold raw pointers into their tensors: finish them before those can be freed.
        pending = getattr(self, "_pending", [])
        for req in pending:
            try:
                req.wait()
            except OSError as exc:
                warn_once(f"ds_kernels.aio: a request nobody waited for failed: {exc}")

    def __enter__(self) -> AsyncIO:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _future_result(fut: Future) -> tuple[int, str]:
    return fut.result()


def _python_transfer(op: str, tensor: torch.Tensor, path: str, offset: int, block: int) -> tuple[int, str]:
    """The fallback engine: buffered pread/pwrite in a loop, errors returned as (errno, message)."""
    view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    try:
        flags = (os.O_WRONLY | os.O_CREAT) if op == "write" else os.O_RDONLY
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        return exc.errno or errno_mod.EIO, f"open: {exc.strerror}"
    try:
        done = 0
        while done < len(view):
            chunk = view[done : done + block]
            if op == "write":
                n = os.pwrite(fd, chunk, offset + done)
            else:
                n = os.preadv(fd, [chunk], offset + done)
            if n == 0:
                what = "short read: end of file" if op == "read" else "short write: no progress"
                return errno_mod.EIO, f"{what} at byte {offset + done} of {offset + len(view)}"
            done += n
        return 0, ""
    except OSError as exc:
        return exc.errno or errno_mod.EIO, exc.strerror or str(exc)
    finally:
        os.close(fd)
