"""init_distributed from each launcher's environment: the variables are read correctly, a missing one is
named, and a real 2-process job starts from torchrun-, SLURM-, OpenMPI- and MPICH-style variables."""
import json
import os
import subprocess
import sys

import pytest
from ds_core.comm import LaunchEnvError, discover_launch_env, free_port
from ds_core.comm.env import first_slurm_host

LAUNCHERS = {
    "torchrun": lambda r, n, port: {"RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r),
                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
    "slurm": lambda r, n, port: {"SLURM_PROCID": str(r), "SLURM_NTASKS": str(n), "SLURM_LOCALID": str(r),
                                 "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)},
    "openmpi": lambda r, n, port: {"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": str(n),
                                   "OMPI_COMM_WORLD_LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port)},
    "mpich/intel-mpi": lambda r, n, port: {"PMI_RANK": str(r), "PMI_SIZE": str(n), "MPI_LOCALRANKID": str(r),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
}


@pytest.mark.parametrize("source", list(LAUNCHERS))
def test_discovers_rank_world_and_master(source):
    env = discover_launch_env(LAUNCHERS[source](3, 8, 1234))
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == (
        3, 8, 3, "127.0.0.1", 1234, source)


def test_no_launcher_gives_none():
    assert discover_launch_env({"HOME": "/root"}) is None


def test_missing_master_addr_is_named():
    env = LAUNCHERS["openmpi"](0, 2, 1)
    del env["MASTER_ADDR"]
    with pytest.raises(LaunchEnvError, match=r"OpenMPI launch detected but \$MASTER_ADDR is not set"):
        discover_launch_env(env)


def test_missing_world_size_is_named():
    with pytest.raises(LaunchEnvError, match=r"\$SLURM_NTASKS is not set"):
        discover_launch_env({"SLURM_PROCID": "0", "SLURM_NODELIST": "a"})
    with pytest.raises(LaunchEnvError, match=r"\$PMI_SIZE is not set"):
        discover_launch_env({"PMI_RANK": "0", "MASTER_ADDR": "x"})


def test_bad_integer_is_named():
    with pytest.raises(LaunchEnvError, match=r"\$RANK='zero' is not an integer"):
        discover_launch_env({"RANK": "zero", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})


@pytest.mark.parametrize("nodelist,first", [("node[07-09,12],gpu3", "node07"), ("gpu3", "gpu3"),
                                            ("a-b[1,2]", "a-b1")])
def test_slurm_nodelist(nodelist, first):
    assert first_slurm_host(nodelist) == first


_CHILD = """
import json, torch
from ds_core import comm
env = comm.init_distributed(dist_backend="gloo", verbose=False)
t = torch.tensor([float(comm.get_rank() + 1)])
comm.all_reduce(t)
print(json.dumps({"rank": comm.get_rank(), "world": comm.get_world_size(), "sum": t.item(), "source": env.source}))
comm.destroy_process_group()
"""


def test_real_two_process_init_from_each_launcher_environment():
    """All four launchers' variable sets start real gloo jobs (run side by side to keep it quick)."""
    procs = []
    for source, make_env in LAUNCHERS.items():
        port = free_port()
        for rank in range(2):
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM", "OMPI", "PMI", "MASTER"))}
            env.update(make_env(rank, 2, port))
            env["OMP_NUM_THREADS"] = "1"
            procs.append((source, subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)))
    results = {}
    for source, proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{source}: {err[-2000:]}"
        rec = json.loads(out.strip().splitlines()[-1])
        results.setdefault(source, []).append(rec)
    for source, recs in results.items():
        assert sorted(r["rank"] for r in recs) == [0, 1]
        assert all(r["world"] == 2 and r["sum"] == 3.0 and r["source"] == source for r in recs)
