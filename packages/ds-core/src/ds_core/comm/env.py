"""Where this process sits in the job: rank, world size, local rank and rendezvous address, read from the
environment of torchrun, SLURM, or an MPI launcher (OpenMPI, MPICH, Intel MPI)."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


class LaunchEnvError(RuntimeError):
    """The launcher's environment is incomplete; the message names the missing variable."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm", "openmpi", "mpich/intel-mpi", "explicit"


DEFAULT_PORT = 29500


def _int(env: Mapping[str, str], name: str, source: str) -> int:
    if name not in env:
        raise LaunchEnvError(f"{source} launch detected but ${name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise LaunchEnvError(f"${name}={env[name]!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``node[07-09,12],gpu3`` -> ``node07``."""
    nodelist = nodelist.strip()
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise LaunchEnvError(f"cannot parse $SLURM_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _master(env: Mapping[str, str], source: str, default_addr: str | None) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR") or default_addr
    if not addr:
        raise LaunchEnvError(
            f"{source} launch detected but $MASTER_ADDR is not set: export MASTER_ADDR=<host of rank 0> "
            "(and MASTER_PORT, default 29500)"
        )
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    return addr, port


def discover_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Rank/world size from the launcher's variables, or None when no launcher is detected."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, ds-train-launch, or a hand-set env
        addr, port = _master(env, "torchrun", None)
        return LaunchEnv(
            _int(env, "RANK", "torchrun"),
            _int(env, "WORLD_SIZE", "torchrun"),
            int(env.get("LOCAL_RANK", 0)),
            addr,
            port,
            "torchrun",
        )
    if "OMPI_COMM_WORLD_RANK" in env:
        addr, port = _master(env, "OpenMPI", None)
        return LaunchEnv(
            _int(env, "OMPI_COMM_WORLD_RANK", "OpenMPI"),
            _int(env, "OMPI_COMM_WORLD_SIZE", "OpenMPI"),
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            addr,
            port,
            "openmpi",
        )
    if "PMI_RANK" in env:  # MPICH (hydra) and Intel MPI
        addr, port = _master(env, "MPICH/Intel MPI", None)
        local = env.get("MPI_LOCALRANKID", env.get("PMI_LOCAL_RANK", "0"))
        return LaunchEnv(
            _int(env, "PMI_RANK", "MPICH/Intel MPI"),
            _int(env, "PMI_SIZE", "MPICH/Intel MPI"),
            int(local),
            addr,
            port,
            "mpich/intel-mpi",
        )
    if "SLURM_PROCID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
        default_addr = first_slurm_host(nodelist) if nodelist else None
        if default_addr is None and "MASTER_ADDR" not in env:
            raise LaunchEnvError("SLURM launch detected but neither $SLURM_NODELIST nor $MASTER_ADDR is set")
        addr, port = _master(env, "SLURM", default_addr)
        return LaunchEnv(
            _int(env, "SLURM_PROCID", "SLURM"),
            _int(env, "SLURM_NTASKS", "SLURM"),
            int(env.get("SLURM_LOCALID", 0)),
            addr,
            port,
            "slurm",
        )
    return None
