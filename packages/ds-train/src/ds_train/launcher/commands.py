"""Build the commands that start a job: torchrun on one node, or torchrun on every node over ssh,
pdsh or srun. Pure functions of a `LaunchPlan`; nothing here runs a process.

Every node runs ``python -u -m torch.distributed.run ... worker_entry.py SCRIPT ARGS`` (torchrun does
the rendezvous and process supervision; `worker_entry` adds DeepSpeed's ``--local_rank``). Over ssh
and pdsh each host gets an explicit ``--node_rank`` in hostfile order with the static rendezvous at
``--master_addr``; under SLURM the same command runs once per node via srun with the c10d rendezvous,
which numbers the nodes itself (srun cannot give each node a different argv).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field

from ds_train.launcher.errors import LauncherError

WORKER_ENTRY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_entry.py")
PDSH_FAN_OUT = 1024  # DeepSpeed's -f value: start every host at once
NODE_RANK_VAR = "DS_LAUNCH_NODE_RANK"
NPROC_VAR = "DS_LAUNCH_NPROC"
# Variables a local (pseudo-remote) launch keeps from this environment; everything else must come
# through the exported variables, exactly as on a real remote host.
LOCAL_BASE_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "TMPDIR", "TERM")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything that decides the commands. ``resources`` maps host -> slot indices; its order is
    the node-rank order (node 0 first, which must be the host at ``master_addr``)."""

    resources: dict[str, list[int]]
    script: str
    script_args: list[str]
    master_addr: str
    master_port: int
    job_id: str
    cwd: str
    exports: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    launcher_args: list[str] = field(default_factory=list)
    ssh_port: int | None = None
    device_env: str = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Command:
    """One process to start. ``env`` is added to the launcher's environment, or, when ``clean_env``
    is set, to only the basic variables in `LOCAL_BASE_ENV` (a stand-in for a fresh remote login)."""

    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    clean_env: bool = False

    def shell(self) -> str:
        """The command as one shell line (for ``--dry_run`` and logs)."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


class _Raw(str):
    """A shell word left unquoted on purpose (a variable expansion)."""


def _shell_join(words: list[str]) -> str:
    return " ".join(w if isinstance(w, _Raw) else shlex.quote(w) for w in words)


def device_exports(plan: LaunchPlan, host: str) -> dict[str, str]:
    """Restrict a host to its selected slots when they are not simply ``0..k-1``."""
    slots = plan.resources[host]
    if slots == list(range(len(slots))):
        return {}
    return {plan.device_env: ",".join(map(str, slots))}


def _entry_args(plan: LaunchPlan) -> list[str]:
    flags = ["--no_local_rank"] if plan.no_local_rank else []
    if plan.module:
        flags.append("--module")
    if plan.no_python:
        flags.append("--no_python")
    return [WORKER_ENTRY, *flags, plan.script, *plan.script_args]


def _word(text: str) -> str:
    return _Raw(text) if "$" in text else text


def torchrun_argv(
    plan: LaunchPlan, nnodes: int, nproc_per_node: str, node_rank: str | None, rendezvous: str = "static"
) -> list[str]:
    """``python -u -m torch.distributed.run ...`` for one node. ``nproc_per_node``/``node_rank`` may
    be shell expansions (``$VAR``, left unquoted); the c10d rendezvous takes no node rank."""
    argv = [
        plan.python,
        "-u",
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        _word(f"--nproc_per_node={nproc_per_node}"),
    ]
    if rendezvous == "static":
        if node_rank is None:
            raise LauncherError("the static rendezvous needs a node rank")
        argv += [
            _word(f"--node_rank={node_rank}"),
            f"--master_addr={plan.master_addr}",
            f"--master_port={plan.master_port}",
        ]
    else:
        argv += ["--rdzv_backend=c10d", f"--rdzv_endpoint={plan.master_addr}:{plan.master_port}"]
    # A unique run id: the rendezvous is tied to this job, and a remote kill can find its torchruns.
    argv.append(f"--rdzv_id={plan.job_id}")
    return argv + _entry_args(plan)


def _exports_line(exports: dict[str, str]) -> list[str]:
    return [f"export {name}={shlex.quote(value)};" for name, value in exports.items()]


def remote_shell_command(plan: LaunchPlan, host: str, node_rank: int) -> str:
    """The shell line a node runs: export the variables, cd to the launch directory, exec torchrun."""
    parts = _exports_line({**plan.exports, **device_exports(plan, host)})
    argv = torchrun_argv(plan, len(plan.resources), str(len(plan.resources[host])), str(node_rank))
    parts += [f"cd {shlex.quote(plan.cwd)} &&", "exec " + _shell_join(argv)]
    return " ".join(parts)


def single_node_command(plan: LaunchPlan) -> Command:
    """torchrun on this machine for a plan with one host."""
    if len(plan.resources) != 1:
        raise LauncherError(f"single-node launch needs exactly one host, got {list(plan.resources)}")
    host = next(iter(plan.resources))
    argv = torchrun_argv(plan, 1, str(len(plan.resources[host])), "0")
    return Command(host, argv, env={**plan.exports, **device_exports(plan, host)})


def _ssh_prefix(plan: LaunchPlan) -> list[str]:
    port = ["-p", str(plan.ssh_port)] if plan.ssh_port is not None else []
    return ["ssh", "-o", "BatchMode=yes", *port, *plan.launcher_args]


def ssh_commands(plan: LaunchPlan) -> list[Command]:
    """One ``ssh HOST 'export ...; cd ...; exec torchrun --node_rank=R ...'`` per host."""
    return [
        Command(f"{host} (node {rank})", [*_ssh_prefix(plan), host, remote_shell_command(plan, host, rank)])
        for rank, host in enumerate(plan.resources)
    ]


def local_commands(plan: LaunchPlan) -> list[Command]:
    """The ssh commands' remote lines run here with ``/bin/sh -c`` in a clean environment: a real
    multi-node launch on one machine (tests, or trying a hostfile before using the cluster)."""
    return [
        Command(
            f"{host} (node {rank}, local)",
            ["/bin/sh", "-c", remote_shell_command(plan, host, rank)],
            clean_env=True,
        )
        for rank, host in enumerate(plan.resources)
    ]


def pdsh_command(plan: LaunchPlan) -> Command:
    """One pdsh command for all hosts. pdsh replaces ``%h`` with each target's name; a ``case`` on it
    sets that host's node rank, process count and device list, so node ranks follow the hostfile
    order whatever order pdsh visits the hosts in."""
    branches = []
    for rank, (host, slots) in enumerate(plan.resources.items()):
        settings = [f"{NODE_RANK_VAR}={rank};", f"{NPROC_VAR}={len(slots)};"]
        settings += _exports_line(device_exports(plan, host))
        branches.append(f"{shlex.quote(host)}) {' '.join(settings)};")
    unknown = '*) echo "ds-train-launch: host %h is not in this job" >&2; exit 2;;'
    chooser = f"case %h in {' '.join(branches)} {unknown} esac;"
    argv = torchrun_argv(plan, len(plan.resources), f"${NPROC_VAR}", f"${NODE_RANK_VAR}")
    body = " ".join(
        [*_exports_line(plan.exports), f"cd {shlex.quote(plan.cwd)} &&", "exec " + _shell_join(argv)]
    )
    # pdsh substitutes %h/%u/%n anywhere in the line; a literal % must be written %%.
    line = chooser + " " + body.replace("%", "%%")
    argv = ["pdsh", "-S", "-f", str(PDSH_FAN_OUT), "-w", ",".join(plan.resources), *plan.launcher_args, line]
    return Command("pdsh", argv, env=_pdsh_env(plan))


def _pdsh_env(plan: LaunchPlan) -> dict[str, str]:
    env = {"PDSH_RCMD_TYPE": "ssh"}
    if plan.ssh_port is not None:
        env["PDSH_SSH_ARGS_APPEND"] = f"-p {plan.ssh_port}"
    return env


def slurm_command(plan: LaunchPlan) -> Command:
    """``srun`` with one task per node running torchrun (c10d rendezvous at ``master_addr``). The
    exports go into srun's own environment, which ``--export=ALL`` hands to every task (srun's
    ``--export=NAME=value`` list cannot carry values containing commas)."""
    slot_sets = {tuple(s) for s in plan.resources.values()}
    if len(slot_sets) != 1:
        raise LauncherError(
            "srun starts the same command on every node, so every node needs the same slots; "
            f"got {plan.resources}; use --launcher ssh or pdsh for uneven hosts"
        )
    nnodes = len(plan.resources)
    any_host = next(iter(plan.resources))
    argv = [
        "srun",
        f"--nodes={nnodes}",
        f"--ntasks={nnodes}",
        "--ntasks-per-node=1",
        f"--nodelist={','.join(plan.resources)}",
        f"--chdir={plan.cwd}",
        "--export=ALL",
        "--kill-on-bad-exit=1",
        *plan.launcher_args,
        *torchrun_argv(plan, nnodes, str(len(plan.resources[any_host])), None, rendezvous="c10d"),
    ]
    return Command("srun", argv, env={**plan.exports, **device_exports(plan, any_host)})


def kill_commands(plan: LaunchPlan, launcher: str) -> list[Command]:
    """Commands that stop this job's remote torchrun agents (each then stops its workers). The
    pattern matches only this job's ``--rdzv_id``; the ``[-]`` keeps it from matching the shell
    that runs pkill."""
    remote = f"pkill -TERM -f -- '[-]-rdzv_id={plan.job_id}'"
    if launcher == "ssh":
        return [Command(f"stop {host}", [*_ssh_prefix(plan), host, remote]) for host in plan.resources]
    if launcher == "pdsh":
        argv = ["pdsh", "-f", str(PDSH_FAN_OUT), "-w", ",".join(plan.resources), *plan.launcher_args, remote]
        return [Command("stop (pdsh)", argv, env=_pdsh_env(plan))]
    return []  # single node, local and srun: signalling the local process reaches every worker
