"""ds-train-launch for real: torchrun on one node, a two-"host" job on loopback through the local
pseudo-launcher (the exact line ssh would run, in a clean environment), the supervisor's failure and
signal handling, and exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from ds_train.launcher.commands import Command
from ds_train.launcher.supervise import supervise

PY = sys.executable

# A DeepSpeed-style script: takes --local_rank, initializes gloo through ds_core.comm, all-reduces a
# vector and writes what it saw. The reference is the same sum computed in one process.
WORKER_SCRIPT = r"""
import argparse, json, os, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=None)
parser.add_argument("--out", required=True)
parser.add_argument("--fail_rank", type=int, default=-1)
parser.add_argument("--sleep", type=float, default=0.0)
args = parser.parse_args()
rank = int(os.environ["RANK"])
if rank == args.fail_rank:  # fail once rank 0 is up, so the test sees a peer left waiting
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(args.out, "pid0")) and time.time() < deadline:
        time.sleep(0.05)
    sys.exit(3)
if args.sleep:
    with open(os.path.join(args.out, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(args.sleep)
import torch
from ds_core import comm
comm.init_distributed(dist_backend="gloo", verbose=False)
vector = torch.arange(4, dtype=torch.float64) * (comm.get_rank() + 1)
comm.all_reduce(vector)
keys = ["LOCAL_RANK", "GROUP_RANK", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE", "CUDA_VISIBLE_DEVICES",
        "NCCL_LAUNCH_TEST", "DS_FROM_ENV_FILE", "UNEXPORTED_LAUNCH_TEST", "PYTHONPATH"]
result = {"rank": comm.get_rank(), "world": comm.get_world_size(), "local_rank_arg": args.local_rank,
          "sum": vector.tolist(), "argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keys}}
with open(os.path.join(args.out, f"rank{comm.get_rank()}.json"), "w") as f:
    json.dump(result, f)
comm.barrier()
comm.destroy_process_group()  # a clean exit: no gloo thread left running at interpreter shutdown
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for_pids(out_dir, ranks, launcher=None, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not all((out_dir / f"pid{r}").exists() for r in ranks):
        assert time.monotonic() < deadline, "workers did not start"
        assert launcher is None or launcher.poll() is None, launcher.stdout.read().decode()[-2000:]
        time.sleep(0.1)
    time.sleep(0.2)
    return [int((out_dir / f"pid{r}").read_text()) for r in ranks]


def _reference_sum(world: int) -> list[float]:
    return [float(i * sum(r + 1 for r in range(world))) for i in range(4)]


def _launch(args: list[str], cwd, env_extra: dict[str, str] | None = None, timeout: float = 120.0):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [PY, "-m", "ds_train.launcher.runner", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _results(out_dir, world: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    return path, out


def test_single_node_two_processes_all_reduce_with_local_rank(tmp_path, script):
    path, out = script
    (tmp_path / ".deepspeed_env").write_text("DS_FROM_ENV_FILE=hello world\n")
    proc = _launch(
        ["--num_procs", "2", "--master_port", str(_free_port()), str(path), "--out", str(out)],
        cwd=tmp_path,
        env_extra={"HOME": str(tmp_path / "nohome")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out, 2)
    for rank, res in enumerate(results):
        assert res["world"] == 2 and res["rank"] == rank
        assert res["sum"] == _reference_sum(2)  # exact: small integers in float64
        assert res["argv"][0] == f"--local_rank={rank}"  # DeepSpeed's convention: first argument
        assert res["local_rank_arg"] == rank and res["env"]["LOCAL_RANK"] == str(rank)
        assert res["env"]["LOCAL_SIZE"] == "2" and res["env"]["CROSS_SIZE"] == "1"
        assert res["env"]["DS_FROM_ENV_FILE"] == "hello world"


def test_two_hosts_on_loopback_form_one_world_of_four(tmp_path, script):
    """Two "hosts" (localhost, 127.0.0.1) with node ranks 0 and 1, each running the exact remote line
    an ssh launch would run, in a clean environment: only the exported variables get through."""
    path, out = script
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two names for this machine\nlocalhost slots=3\n127.0.0.1 slots=2\n")
    env_file = tmp_path / "launch.env"
    env_file.write_text("DS_FROM_ENV_FILE=it's here\n")
    args = [
        "--hostfile",
        str(hostfile),
        "--include",
        "localhost:0,2@127.0.0.1",
        "--launcher",
        "local",
        "--master_port",
        str(_free_port()),
        "--env_file",
        str(env_file),
        str(path),
        "--out",
        str(out),
    ]
    proc = _launch(
        args, cwd=tmp_path, env_extra={"NCCL_LAUNCH_TEST": "forwarded", "UNEXPORTED_LAUNCH_TEST": "x"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out, 4)
    for rank, res in enumerate(results):
        node = 0 if rank < 2 else 1
        assert res["world"] == 4 and res["rank"] == rank
        assert res["sum"] == _reference_sum(4)
        assert res["argv"][0] == f"--local_rank={rank % 2}"
        env = res["env"]
        assert env["GROUP_RANK"] == str(node) and env["CROSS_RANK"] == str(node) and env["CROSS_SIZE"] == "2"
        assert env["CUDA_VISIBLE_DEVICES"] == ("0,2" if node == 0 else None)  # slots 0,2 of 'localhost'
        assert env["NCCL_LAUNCH_TEST"] == "forwarded" and env["DS_FROM_ENV_FILE"] == "it's here"
        assert env["UNEXPORTED_LAUNCH_TEST"] is None  # not exported, so a remote host would not see it
        assert env["PYTHONPATH"].split(":")[0] == str(tmp_path)


def test_failing_worker_gives_nonzero_exit_and_stops_the_other_node(tmp_path, script):
    """Rank 1 (node 1) exits with status 3 while rank 0 (node 0) waits as if for its peer: the launcher
    must stop node 0 (its worker would otherwise wait until the collective timeout) and fail."""
    path, out = script
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    launcher = subprocess.Popen(
        [
            PY,
            "-m",
            "ds_train.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--launcher",
            "local",
            "--master_port",
            str(_free_port()),
            str(path),
            "--out",
            str(out),
            "--fail_rank",
            "1",
            "--sleep",
            "300",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output = launcher.communicate(timeout=120)[0].decode()
        assert launcher.returncode == 1, output[-3000:]  # torchrun's status for a failed worker
        assert "exited with status 1; stopping the others" in output
        assert not _alive(int((out / "pid0").read_text()))
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_sigint_stops_the_launcher_and_every_worker(tmp_path, script):
    path, out = script
    launcher = subprocess.Popen(
        [
            PY,
            "-m",
            "ds_train.launcher.runner",
            "--num_procs",
            "2",
            "--master_port",
            str(_free_port()),
            "--stop_timeout",
            "20",
            str(path),
            "--out",
            str(out),
            "--sleep",
            "300",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pids = _wait_for_pids(out, [0, 1], launcher)
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=60) == 128 + signal.SIGINT
        assert not any(_alive(pid) for pid in pids)  # the workers are gone, not orphaned
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


# ---------------------------------------------------------------- supervisor, no torch
def test_supervise_returns_first_failure_and_stops_the_rest():
    start = time.monotonic()
    status = supervise(
        [
            Command("fails", ["/bin/sh", "-c", "sleep 0.2; exit 3"]),
            Command("sleeps", ["/bin/sh", "-c", "sleep 30"]),
        ],
        grace_s=5,
    )
    assert status == 3 and time.monotonic() - start < 10
    assert supervise([Command("ok", ["/bin/sh", "-c", "exit 0"]), Command("ok2", ["true"])]) == 0


def test_supervise_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    marker = tmp_path / "started"
    stubborn = Command("stubborn", ["/bin/sh", "-c", f"trap '' TERM INT; touch {marker}; sleep 30"])

    def interrupt() -> None:
        while not marker.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=interrupt)
    thread.start()
    start = time.monotonic()
    status = supervise([stubborn], grace_s=0.5)
    thread.join()
    assert status == 128 + signal.SIGTERM and time.monotonic() - start < 10


def test_supervise_clean_env_passes_only_basic_and_exported_variables():
    command = Command(
        "env",
        ["/bin/sh", "-c", 'test -z "$SECRET_LAUNCH_TEST" && test "$KEPT" = yes'],
        env={"KEPT": "yes"},
        clean_env=True,
    )
    assert supervise([command], environ={**os.environ, "SECRET_LAUNCH_TEST": "1"}) == 0
    leaky = Command("env", command.argv, env={"KEPT": "yes"})
    assert supervise([leaky], environ={**os.environ, "SECRET_LAUNCH_TEST": "1"}) == 1


@pytest.mark.skipif(shutil.which("pdsh") is None, reason="pdsh is not installed")
def test_pdsh_command_runs_for_real_through_pdsh_exec_module(tmp_path, script):
    """The exact pdsh line, run by pdsh's 'exec' module (``sh -c LINE`` per host instead of ssh):
    pdsh's %h substitution must pick each host's node rank."""
    from ds_train.launcher.commands import LaunchPlan, pdsh_command
    from ds_train.launcher.environment import collect_exports

    path, out = script
    plan = LaunchPlan(
        resources={"localhost": [0], "127.0.0.1": [0]},
        script=str(path),
        script_args=["--out", str(out)],
        master_addr="localhost",
        master_port=_free_port(),
        job_id="ds-pdsh-test",
        cwd=str(tmp_path),
        python=PY,
        exports=collect_exports(os.environ, str(tmp_path), []),
    )
    command = pdsh_command(plan)
    argv = ["pdsh", "-R", "exec", *command.argv[1:-1], "sh", "-c", command.argv[-1]]
    proc = subprocess.run(
        argv, env={**os.environ, **command.env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(out, 2)
    assert [r["env"]["GROUP_RANK"] for r in results] == ["0", "1"]
    assert all(r["world"] == 2 and r["sum"] == _reference_sum(2) for r in results)


# A stand-in for ssh: runs the remote line in its own session (out of reach of local signals, like a
# process on another machine) and logs every call, so the ssh path runs end to end without sshd.
FAKE_SSH = r"""#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o|-p) shift 2;; -*) shift;; *) break;; esac; done
host=$1; shift
echo "$host $*" >> "$FAKE_SSH_LOG"
setsid /bin/sh -c "$*" &
wait $!
"""


def test_ssh_launch_end_to_end_and_sigterm_stops_remote_workers(tmp_path, script):
    path, out = script
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    log = tmp_path / "ssh.log"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SSH_LOG": str(log)}
    launcher = subprocess.Popen(
        [
            PY,
            "-m",
            "ds_train.launcher.runner",
            "--hostfile",
            str(hostfile),
            "--launcher",
            "ssh",
            "--master_port",
            str(_free_port()),
            str(path),
            "--out",
            str(out),
            "--sleep",
            "300",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        pids = _wait_for_pids(out, [0, 1], launcher)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30  # the remote side stops after the kill command reached it
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for pid_file in out.glob("pid*"):  # never leave a "remote" worker behind if the test failed
            if _alive(pid := int(pid_file.read_text())):
                os.kill(pid, signal.SIGKILL)
    calls = log.read_text().splitlines()
    assert calls[0] == "localhost true"  # the password-less ssh probe
    launches = [c for c in calls if "torch.distributed.run" in c]
    assert [c.split()[0] for c in launches] == ["localhost", "127.0.0.1"]
    assert "--node_rank=0" in launches[0] and "--node_rank=1" in launches[1]
    kills = [c for c in calls if "pkill" in c]
    assert sorted(c.split()[0] for c in kills) == ["127.0.0.1", "localhost"]
