"""``ds-train-launch``: DeepSpeed's ``deepspeed`` launcher conventions on top of torchrun.

    ds-train-launch --num_procs 2 train.py --deepspeed_config ds.json
    ds-train-launch --hostfile hosts --include "worker-0@worker-1:0,2" --launcher ssh train.py ...

Parses the flags, builds a `LaunchPlan`, turns it into commands (`commands.py`) and supervises them
(`supervise.py`). The launcher modules import neither torch nor torch.distributed (only the
`ds_train` package `__init__` may), and the per-node processes never import `ds_train`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence

from ds_train.launcher.commands import (
    Command,
    LaunchPlan,
    device_exports,
    kill_commands,
    local_commands,
    pdsh_command,
    single_node_command,
    slurm_command,
    ssh_commands,
    torchrun_argv,
)
from ds_train.launcher.environment import collect_exports, default_env_files, read_env_file
from ds_train.launcher.errors import LauncherError
from ds_train.launcher.hostfile import limit_resources, read_hostfile, select_resources
from ds_train.launcher.supervise import supervise

DEFAULT_HOSTFILE = "/job/hostfile"  # DeepSpeed's default, read only when it exists
DEFAULT_MASTER_PORT = 29500
LAUNCHERS = ("pdsh", "ssh", "slurm", "local")
OTHER_DEEPSPEED_LAUNCHERS = ("openmpi", "mvapich", "mpich", "impi", "jsrun")
# DeepSpeed flags this launcher does not implement: rejected by name instead of silently ignored.
UNSUPPORTED_FLAGS = {
    "--autotuning": (1, "autotuning is not implemented"),
    "--elastic_training": (0, "elastic training is not implemented; use torchrun's elastic mode directly"),
    "--min_elastic_nodes": (1, "elastic training is not implemented"),
    "--max_elastic_nodes": (1, "elastic training is not implemented"),
    "--save_pid": (0, "pid files are not written"),
    "--enable_each_rank_log": (1, "per-rank log files are not implemented"),
    "--bind_cores_to_rank": (0, "core binding is not implemented"),
    "--bind_core_list": (1, "core binding is not implemented"),
}
DEVICE_ENV_BY_ACCELERATOR = {
    "xpu": "ZE_AFFINITY_MASK"
}  # everything else (CUDA, ROCm) reads CUDA_VISIBLE_DEVICES


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 - argparse API
        parser.error(
            f"{option_string} is not supported by ds-train-launch: {UNSUPPORTED_FLAGS[self.dest_flag][1]}"
        )

    def __init__(self, option_strings, dest, nargs=None, **kwargs):  # noqa: ANN001 - argparse API
        self.dest_flag = option_strings[0]
        super().__init__(option_strings, dest, nargs=UNSUPPORTED_FLAGS[option_strings[0]][0], **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds-train-launch",
        allow_abbrev=False,
        description="Launch a training script on one or many nodes with torchrun (DeepSpeed's launcher flags).",
    )
    p.add_argument(
        "-H",
        "--hostfile",
        default=None,
        help=f"'HOST slots=N' lines; default {DEFAULT_HOSTFILE} when it exists, else this machine only",
    )
    p.add_argument("-i", "--include", default="", help="use only these resources: 'worker-0@worker-1:0,2'")
    p.add_argument(
        "-e", "--exclude", default="", help="use all resources but these (same syntax as --include)"
    )
    p.add_argument("--num_nodes", type=int, default=None, help="use the first N hosts of the hostfile")
    p.add_argument(
        "--num_procs",
        "--num_gpus",
        "--num_accelerators",
        dest="num_procs",
        type=int,
        default=None,
        help="processes per node (the first N slots of each host); default: all slots, or the "
        "accelerator's device count without a hostfile",
    )
    p.add_argument(
        "--master_addr",
        default=None,
        help="address of node 0; default: 127.0.0.1 on one node, else the first host's name",
    )
    p.add_argument("--master_port", type=int, default=DEFAULT_MASTER_PORT)
    p.add_argument(
        "--launcher",
        default="pdsh",
        help=f"multi-node launcher: {', '.join(LAUNCHERS)} ('local' runs "
        "every host's command on this machine)",
    )
    p.add_argument("--launcher_args", default="", help="extra arguments for ssh/pdsh/srun, one quoted string")
    p.add_argument("--ssh_port", type=int, default=None, help="ssh port for the ssh and pdsh launchers")
    p.add_argument("--comment", default=None, help="srun --comment (slurm launcher only)")
    p.add_argument("--account", default=None, help="srun --account (slurm launcher only)")
    p.add_argument(
        "--env_file",
        default=None,
        help="NAME=value file exported to every node; default: "
        ".deepspeed_env in $HOME then in the working directory",
    )
    p.add_argument("--module", action="store_true", help="run the script as a module (python -m)")
    p.add_argument("--no_python", action="store_true", help="execute the script directly, not with python")
    p.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank=N to the script")
    p.add_argument("--force_multi", action="store_true", help="use the multi-node launcher even for one host")
    p.add_argument(
        "--no_ssh_check", action="store_true", help="skip the passwordless-ssh check of the first host"
    )
    p.add_argument(
        "--no_ssh",
        action="store_true",
        help="start only this machine's part of a multi-node job (run it on every host with its --node_rank)",
    )
    p.add_argument("--node_rank", type=int, default=None, help="this machine's node rank, with --no_ssh")
    p.add_argument(
        "--stop_timeout",
        type=float,
        default=30.0,
        help="seconds to wait after SIGTERM before SIGKILL when stopping the job",
    )
    p.add_argument("--dry_run", action="store_true", help="print the commands instead of running them")
    for flag in UNSUPPORTED_FLAGS:
        p.add_argument(flag, action=_Unsupported, help=argparse.SUPPRESS)
    p.add_argument("user_script", help="the training script (or module with --module)")
    p.add_argument("user_args", nargs=argparse.REMAINDER, help="arguments for the script")
    return p


def _device_count() -> int:
    # Imported here so that the launcher itself never imports torch unless it must count devices.
    from ds_core.accelerator import get_accelerator

    return get_accelerator().device_count()


def _is_this_machine(host: str) -> bool:
    name = socket.gethostname()
    return host in ("localhost", "127.0.0.1", "::1", name, name.split(".")[0])


def resource_pool(args: argparse.Namespace) -> tuple[dict[str, int], bool]:
    """``({host: slots}, from_hostfile)``."""
    if args.hostfile is not None:
        return read_hostfile(args.hostfile), True
    if os.path.isfile(DEFAULT_HOSTFILE):
        return read_hostfile(DEFAULT_HOSTFILE), True
    if args.num_nodes is not None and args.num_nodes > 1:
        raise LauncherError(f"--num_nodes {args.num_nodes} needs a hostfile listing the nodes (--hostfile)")
    slots = args.num_procs if args.num_procs is not None else _device_count()
    if slots < 1:
        raise LauncherError("no accelerator device found; pass --num_procs N")
    return {"localhost": slots}, False


def make_plan(args: argparse.Namespace, environ: dict[str, str], cwd: str) -> tuple[LaunchPlan, bool]:
    """The plan and whether it runs as a multi-node job."""
    if args.launcher in OTHER_DEEPSPEED_LAUNCHERS:
        raise LauncherError(
            f"--launcher {args.launcher} is not supported by ds-train-launch; use one of "
            f"{', '.join(LAUNCHERS)}"
        )
    if args.launcher not in LAUNCHERS:
        raise LauncherError(f"unknown --launcher {args.launcher!r}; use one of {', '.join(LAUNCHERS)}")
    if (args.include or args.exclude) and (args.num_nodes is not None or args.num_procs is not None):
        raise LauncherError("--num_nodes/--num_procs cannot be combined with --include/--exclude")
    if args.module and args.no_python:
        raise LauncherError("--module and --no_python are mutually exclusive")
    if (args.comment or args.account) and args.launcher != "slurm":
        raise LauncherError("--comment/--account are srun options; they need --launcher slurm")
    if args.ssh_port is not None and args.launcher not in ("ssh", "pdsh"):
        raise LauncherError(
            f"--ssh_port is used by the ssh and pdsh launchers, not --launcher {args.launcher}"
        )
    if args.launcher_args and args.launcher == "local":
        raise LauncherError(
            "--launcher_args has no meaning for --launcher local (nothing wraps the commands)"
        )
    if args.node_rank is not None and not args.no_ssh:
        raise LauncherError("--node_rank is only used with --no_ssh")
    pool, from_hostfile = resource_pool(args)
    active = select_resources(pool, args.include, args.exclude)
    active = limit_resources(active, args.num_nodes, args.num_procs if from_hostfile else None)
    if args.launcher == "slurm" and not from_hostfile:
        raise LauncherError(
            "--launcher slurm needs a hostfile naming the allocated nodes, e.g. "
            "`scontrol show hostnames | sed 's/$/ slots=N/' > hostfile`"
        )
    # DeepSpeed runs a one-host job locally; we do that only when the host is this machine, so that
    # `--include worker-3` starts on worker-3 rather than here (DeepSpeed needs --force_multi for it).
    only_here = len(active) == 1 and _is_this_machine(next(iter(active)))
    multi = (not only_here or args.force_multi) and not args.no_ssh
    if args.no_ssh and (args.node_rank is None or not 0 <= args.node_rank < len(active)):
        raise LauncherError(
            f"--no_ssh needs --node_rank in [0, {len(active) - 1}] for the {len(active)} hosts"
        )
    master_addr = args.master_addr or (next(iter(active)) if (multi or args.no_ssh) else "127.0.0.1")
    env_files = [args.env_file] if args.env_file else default_env_files(cwd, os.path.expanduser("~"), environ)
    if args.env_file:
        read_env_file(args.env_file)  # a missing or bad explicit file is an error even on one node
    launcher_args = shlex.split(args.launcher_args)
    if args.comment:
        launcher_args.append(f"--comment={args.comment}")
    if args.account:
        launcher_args.append(f"--account={args.account}")
    accelerator = environ.get("DS_ACCELERATOR", "cuda").strip().lower()
    plan = LaunchPlan(
        resources=active,
        script=args.user_script,
        script_args=list(args.user_args),
        master_addr=master_addr,
        master_port=args.master_port,
        job_id=f"ds-{uuid.uuid4().hex[:12]}",
        cwd=cwd,
        exports=collect_exports(environ, cwd, env_files),
        module=args.module,
        no_python=args.no_python,
        no_local_rank=args.no_local_rank,
        launcher_args=launcher_args,
        ssh_port=args.ssh_port,
        device_env=DEVICE_ENV_BY_ACCELERATOR.get(accelerator, "CUDA_VISIBLE_DEVICES"),
    )
    return plan, multi


def plan_commands(
    plan: LaunchPlan, multi: bool, launcher: str, node_rank: int | None = None
) -> list[Command]:
    if node_rank is not None:  # --no_ssh: this machine's share of a multi-node job
        host = list(plan.resources)[node_rank]
        argv = torchrun_argv(plan, len(plan.resources), str(len(plan.resources[host])), str(node_rank))
        env = {**plan.exports, **device_exports(plan, host)}
        return [Command(f"{host} (node {node_rank})", argv, env=env)]
    if not multi:
        return [single_node_command(plan)]
    if launcher == "ssh":
        return ssh_commands(plan)
    if launcher == "pdsh":
        return [pdsh_command(plan)]
    if launcher == "slurm":
        return [slurm_command(plan)]
    return local_commands(plan)


def _preflight(plan: LaunchPlan, launcher: str, check_ssh: bool) -> None:
    binary = {"ssh": "ssh", "pdsh": "pdsh", "slurm": "srun"}.get(launcher)
    if binary and shutil.which(binary) is None:
        raise LauncherError(
            f"--launcher {launcher} needs '{binary}' on PATH; install it or choose another launcher"
        )
    if check_ssh and launcher in ("ssh", "pdsh"):
        host = next(iter(plan.resources))
        port = ["-p", str(plan.ssh_port)] if plan.ssh_port is not None else []
        probe = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *port, host, "true"]
        probe_result = subprocess.run(
            probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        )
        if probe_result.returncode != 0:
            raise LauncherError(
                f"cannot ssh to {host!r} without a password ({shlex.join(probe)} failed); set up "
                "passwordless ssh or pass --no_ssh_check"
            )


def _describe(plan: LaunchPlan, multi: bool, launcher: str) -> str:
    total = sum(len(s) for s in plan.resources.values())
    hosts = ", ".join(f"{h}:{','.join(map(str, s))}" for h, s in plan.resources.items())
    how = f"{launcher} launcher" if multi else "torchrun on this machine"
    return f"{total} processes on {len(plan.resources)} node(s) [{hosts}] via {how}, master {plan.master_addr}:{plan.master_port}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan, multi = make_plan(args, dict(os.environ), os.getcwd())
        commands = plan_commands(plan, multi, args.launcher, args.node_rank if args.no_ssh else None)
        if args.dry_run:
            for command in commands:
                print(f"# {command.label}\n{command.shell()}")
            return 0
        _preflight(plan, args.launcher if multi else "local", check_ssh=multi and not args.no_ssh_check)
    except LauncherError as exc:
        print(f"ds-train-launch: error: {exc}", file=sys.stderr)
        return 2
    print(f"[ds-train-launch] {_describe(plan, multi, args.launcher)}", file=sys.stderr, flush=True)
    stoppers = kill_commands(plan, args.launcher) if multi else []
    return supervise(commands, stoppers, grace_s=args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
