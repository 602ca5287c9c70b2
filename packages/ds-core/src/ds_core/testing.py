"""Run a function in N real processes on gloo, reusing a pool of workers across calls.

Each spawned process costs seconds, almost all of it importing torch; the pool pays that once per
test session. `run_distributed(fn, world_size, *args)` runs `fn(*args)` on ranks 0..world_size-1 with
`ds_core.comm` initialized, and returns the per-rank results. A failure on any rank raises one error
with every rank's traceback; a hang is cut off by `timeout` and the pool is rebuilt.
"""
from __future__ import annotations

import atexit
import importlib
import importlib.util
import inspect
import multiprocessing as mp
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["DistributedTestError", "run_distributed", "shutdown_pool"]


class DistributedTestError(RuntimeError):
    pass


def _locate(fn: Callable) -> tuple[str, str, str]:
    module = fn.__module__
    path = inspect.getfile(fn)
    return module, path, fn.__qualname__


def _load_function(module: str, path: str, qualname: str) -> Callable:
    if module in sys.modules:
        mod = sys.modules[module]
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            # pytest's importlib mode gives test modules names that are not importable: load by path.
            spec = importlib.util.spec_from_file_location(module, path)
            if spec is None or spec.loader is None:
                raise
            mod = importlib.util.module_from_spec(spec)
            sys.modules[module] = mod
            spec.loader.exec_module(mod)
    obj: Any = mod
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(rank: int, conn: Any) -> None:
    import torch

    while True:
        try:
            job = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if job is None:
            return
        where, args, kwargs, world_size, port, pg_timeout_s, threads = job
        os.environ.update({
            "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        })
        try:
            torch.set_num_threads(threads)
            from ds_core import comm

            comm.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=pg_timeout_s), verbose=False)
            try:
                fn = _load_function(*where)
                result = fn(*args, **kwargs)
            finally:
                comm.comms_logger.configure(enabled=False)
                comm.comms_logger.reset()
                comm.force_fallback(None)
                comm.destroy_process_group()
            conn.send(("ok", result))
        except BaseException as exc:  # report every failure, including SystemExit from the function
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class _Pool:
    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._conns: list[Any] = []

    def ensure(self, size: int) -> None:
        if any(not p.is_alive() for p in self._procs):
            self.close()  # a dead worker poisons the next rendezvous: start afresh
        while len(self._procs) < size:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=_worker_main, args=(len(self._procs), child), daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(parent)

    def close(self, kill: bool = False) -> None:
        """Stop the workers: politely at the end of a session, at once (`kill`) after a hang or a failure."""
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=0.5 if kill else 5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs, self._conns = [], []

    def run(self, where: tuple, args: tuple, kwargs: dict, world_size: int, timeout: float) -> list[Any]:
        from ds_core.comm import free_port

        self.ensure(world_size)
        threads = max(1, (os.cpu_count() or 2) // world_size)
        job = (where, args, kwargs, world_size, free_port(), max(30.0, timeout), threads)
        for conn in self._conns[:world_size]:
            conn.send(job)
        results: list[Any] = [None] * world_size
        errors: list[str] = []
        for rank, conn in enumerate(self._conns[:world_size]):
            # Once a rank has failed, its peers are usually stuck in a collective: wait only briefly.
            if not conn.poll(timeout if not errors else 10.0):
                self.close(kill=True)
                if errors:
                    raise DistributedTestError(f"{where[2]} failed:\n" + "\n".join(errors))
                raise DistributedTestError(
                    f"{where[2]} on {world_size} ranks: rank {rank} gave no result within {timeout:.0f} s "
                    f"(a hang or a deadlock in a collective); other errors so far: {errors or 'none'}"
                )
            try:
                status, value = conn.recv()
            except EOFError:
                self.close(kill=True)
                raise DistributedTestError(f"{where[2]}: worker for rank {rank} died") from None
            if status == "ok":
                results[rank] = value
            else:
                errors.append(value)
        if errors:
            raise DistributedTestError(f"{where[2]} failed on {len(errors)} of {world_size} ranks:\n" + "\n".join(errors))
        return results


_pool: _Pool | None = None


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0, **kwargs: Any) -> list[Any]:
    """Run module-level `fn(*args, **kwargs)` on `world_size` gloo ranks; return each rank's result."""
    global _pool
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if _pool is None:
        _pool = _Pool()
        atexit.register(shutdown_pool)
    return _pool.run(_locate(fn), args, kwargs, world_size, timeout)


def shutdown_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None
