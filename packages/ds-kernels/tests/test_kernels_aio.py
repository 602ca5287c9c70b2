"""Async file I/O: round trips on every engine, unaligned sizes and offsets, and the failure modes."""

from __future__ import annotations

import errno
import os
import resource

import pytest
import torch
from ds_kernels import aio
from ds_kernels.aio import AsyncIO, aligned_empty


@pytest.fixture(params=aio.engines())
def engine(request):
    return request.param


def test_aligned_empty_is_aligned():
    for dtype in (torch.float32, torch.bfloat16, torch.uint8):
        t = aligned_empty(1000, dtype)
        assert t.data_ptr() % 4096 == 0 and t.numel() == 1000 and t.dtype == dtype


@pytest.mark.parametrize("numel", [1, 4096, 3 * (1 << 18) + 123])
def test_round_trip(tmp_path, engine, numel):
    io = AsyncIO(block_size=1 << 18, queue_depth=8, threads=2, engine=engine)
    assert io.engine == engine
    src = aligned_empty(numel, torch.float32)
    src.copy_(torch.randn(numel))
    path = tmp_path / "t.bin"
    io.submit_write(src, path).wait()
    assert os.path.getsize(path) == numel * 4
    dst = aligned_empty(numel, torch.float32)
    dst.zero_()
    io.submit_read(dst, path).wait()
    assert torch.equal(src, dst)


def test_unaligned_buffer_and_offset_and_many_requests(tmp_path, engine):
    io = AsyncIO(block_size=1 << 16, queue_depth=4, threads=3, engine=engine)
    path = tmp_path / "many.bin"
    tensors = [torch.randn(5000 + i * 7).to(torch.bfloat16)[1:] for i in range(6)]  # [1:] breaks alignment
    offsets, off = [], 100
    for t in tensors:
        offsets.append(off)
        off += t.numel() * 2 + 13
    for t, o in zip(tensors, offsets):
        io.submit_write(t, path, offset=o)
    io.wait_all()
    back = [torch.empty_like(t) for t in tensors]
    reqs = [io.submit_read(b, path, offset=o) for b, o in zip(back, offsets)]
    for r in reqs:
        r.wait()
    for t, b in zip(tensors, back):
        assert torch.equal(t, b)


def test_missing_file_raises_file_not_found_naming_it(tmp_path, engine):
    io = AsyncIO(engine=engine)
    missing = tmp_path / "nope" / "x.bin"
    with pytest.raises(FileNotFoundError) as info:
        io.submit_read(torch.empty(10), missing).wait()
    assert str(missing) in str(info.value)
    with pytest.raises(FileNotFoundError):
        io.submit_write(torch.empty(10), missing).wait()


def test_short_file_read_is_an_error(tmp_path, engine):
    io = AsyncIO(engine=engine)
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 100)
    with pytest.raises(OSError, match="short read") as info:
        io.submit_read(torch.empty(1000, dtype=torch.uint8), path).wait()
    assert info.value.filename == str(path)


def test_writing_a_directory_is_an_error(tmp_path, engine):
    with pytest.raises(IsADirectoryError):
        AsyncIO(engine=engine).submit_write(torch.empty(10), tmp_path).wait()


def test_full_disk_is_reported_not_done(tmp_path, engine):
    """RLIMIT_FSIZE makes writes past 64 KiB fail with EFBIG, as a full disk fails with ENOSPC
    (Python ignores SIGXFSZ, so the write returns the error instead of killing the process)."""
    io = AsyncIO(block_size=1 << 16, engine=engine)
    path = tmp_path / "full.bin"
    data = aligned_empty(1 << 20, torch.uint8)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        req = io.submit_write(data, path)
        with pytest.raises(OSError) as info:
            req.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno in (errno.EFBIG, errno.ENOSPC, errno.EIO)
    assert info.value.filename == str(path)
    assert req.done()  # finished, with the error recorded
    with pytest.raises(OSError):  # waiting again repeats the error, never reports success
        req.wait()


def test_compute_runs_while_transfer_is_in_flight(tmp_path, engine):
    """submit returns at once; the caller computes, then waits (the speed claim is in bench_aio.py)."""
    io = AsyncIO(block_size=1 << 20, threads=2, engine=engine)
    data = aligned_empty(32 << 20, torch.uint8)
    data.fill_(7)
    req = io.submit_write(data, tmp_path / "overlap.bin")
    a = torch.randn(128, 128)
    polls = 0
    while not req.done():  # done() never blocks: the caller computes until the transfer has finished
        a = torch.tanh(a @ a)
        polls += 1
    assert polls < 10_000_000
    req.wait()
    assert req.done() and os.path.getsize(tmp_path / "overlap.bin") == 32 << 20
    back = aligned_empty(32 << 20, torch.uint8)
    io.submit_read(back, tmp_path / "overlap.bin").wait()
    assert torch.equal(back, data)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown aio engine"):
        AsyncIO(engine="libaio-please")
    with pytest.raises(ValueError, match="multiple of 4096"):
        AsyncIO(block_size=1000)
    with pytest.raises(ValueError, match="contiguous"):
        AsyncIO().submit_write(torch.randn(10, 10).t(), "/tmp/never-written.bin")
    with pytest.raises(ValueError, match="offset"):
        AsyncIO().submit_read(torch.empty(4), "/tmp/never-read.bin", offset=-1)


def test_read_only_path_raises_permission_error(tmp_path, engine):
    if os.geteuid() != 0:
        target = tmp_path / "ro.bin"
        target.write_bytes(b"x")
        target.chmod(0o444)
    else:  # root ignores file modes: use a sysfs file that has no write handler
        target = "/sys/kernel/notes"
        if not os.path.exists(target):
            pytest.skip("no read-only file available to root here")
    with pytest.raises(PermissionError) as info:
        AsyncIO(engine=engine).submit_write(torch.ones(10), target).wait()
    assert str(target) in str(info.value)


@pytest.mark.skipif(not os.path.exists("/proc/version"), reason="needs procfs")
def test_error_inside_write_is_reported(engine):
    """Opening /proc/version for writing succeeds but every write fails (EIO through io_uring, ESPIPE
    through pwrite), like a device error after open: the errno and the file reach the caller."""
    with pytest.raises(OSError) as info:
        AsyncIO(engine=engine).submit_write(torch.ones(10), "/proc/version").wait()
    assert info.value.errno in (errno.EIO, errno.ESPIPE) and info.value.filename == "/proc/version"
