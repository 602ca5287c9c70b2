"""`init_distributed`: start torch.distributed from whatever launcher started this process."""
from __future__ import annotations

import atexit
import os
import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ds_core.accelerator import get_accelerator
from ds_core.comm.env import DEFAULT_PORT, LaunchEnv, LaunchEnvError, discover_launch_env
from ds_core.logging import log_dist

DEFAULT_TIMEOUT = timedelta(minutes=30)


def free_port() -> int:
    """A TCP port free on this host right now (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeout_from_env() -> timedelta | None:
    value = os.environ.get("DS_DIST_TIMEOUT_S")
    return timedelta(seconds=float(value)) if value else None


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = DEFAULT_PORT,
    verbose: bool = True,
    timeout: timedelta | None = None,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> LaunchEnv:
    """Initialize the default process group (idempotent) and return where this process sits.

    Order: explicit `rank`/`world_size`, then torchrun, OpenMPI, MPICH/Intel MPI and SLURM variables.
    With none of them, a single-process group on 127.0.0.1 is started, so a script runs unchanged
    without a launcher. The backend defaults to the accelerator's (nccl, xccl, gloo).
    """
    if dist_init_required is False:
        raise ValueError("dist_init_required=False is not supported: ds_core always needs a process group")
    backend = dist_backend or get_accelerator().communication_backend_name()
    timeout = timeout or _timeout_from_env() or DEFAULT_TIMEOUT
    if dist.is_initialized():
        return LaunchEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                         os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", 0)), "existing")

    if rank >= 0 or world_size > 0:
        if rank < 0 or world_size <= 0:
            raise LaunchEnvError("give both rank and world_size, or neither")
        if init_method is None and "MASTER_ADDR" not in os.environ:
            raise LaunchEnvError("explicit rank/world_size need init_method or $MASTER_ADDR/$MASTER_PORT")
        env = LaunchEnv(rank, world_size, int(os.environ.get("LOCAL_RANK", 0)),
                        os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", distributed_port)),
                        "explicit")
    else:
        found = discover_launch_env() if auto_mpi_discovery or "RANK" in os.environ else None
        if found is None:
            env = LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single-process")
        else:
            env = found

    # Make the discovered values visible to code that reads the usual variables (torch, HF, users).
    os.environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
    })
    if env.master_addr:
        os.environ["MASTER_ADDR"] = env.master_addr
        os.environ["MASTER_PORT"] = str(env.master_port)

    acc = get_accelerator()
    if acc.name != "cpu" and acc.device_count() > 0:
        acc.set_device(env.local_rank % acc.device_count())

    dist.init_process_group(
        backend=backend,
        init_method=init_method or "env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    atexit.register(_destroy_at_exit)
    if verbose:
        log_dist(f"initialized {backend} process group: world size {env.world_size} (from {env.source})", ranks=[0])
    return env


def _destroy_at_exit() -> None:
    """Tear the group down before interpreter exit: gloo under torch 2.13 can abort a process that
    exits with its default group still alive ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # at exit there is nobody left to report to
            pass
