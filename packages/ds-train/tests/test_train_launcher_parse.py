"""ds-train-launch: hostfile, --include/--exclude, env file, exports and the exact commands built
for one node, ssh, pdsh, slurm and the local pseudo-launcher. No process is started here."""

from __future__ import annotations

import shlex
import sys

import pytest
from ds_train.launcher.commands import (
    WORKER_ENTRY,
    LaunchPlan,
    kill_commands,
    local_commands,
    pdsh_command,
    single_node_command,
    slurm_command,
    ssh_commands,
)
from ds_train.launcher.environment import collect_exports, default_env_files, parse_env_text, read_env_file
from ds_train.launcher.errors import LauncherError
from ds_train.launcher.hostfile import (
    limit_resources,
    parse_hostfile_text,
    parse_node_specs,
    read_hostfile,
    select_resources,
)
from ds_train.launcher.runner import build_parser, main, make_plan, plan_commands
from ds_train.launcher.worker_entry import build_argv

PY = sys.executable


# ---------------------------------------------------------------- hostfile
def test_hostfile_parses_hosts_in_order_with_comments_and_blank_lines():
    text = "# cluster\n\nworker-1 slots=4\nworker-0   slots=2   # trailing comment\n\n"
    assert list(parse_hostfile_text(text).items()) == [("worker-1", 4), ("worker-0", 2)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("a slots=2\nb slots=1\na slots=4\n", "hf:3: duplicate host 'a' (first listed on line 1)"),
        ("a slots=2\nb slot=2\n", "hf:2: expected 'HOST slots=N'"),
        ("a slots=2\nb\n", "hf:2: expected 'HOST slots=N'"),
        ("a slots=0\n", "hf:1: host 'a' has slots=0; need slots >= 1"),
        ("a slots=-1\n", "hf:1: host 'a' has slots=-1"),
        ("a slots=two\n", "hf:1: slots must be an integer, got 'slots=two'"),
        ("a slots=2 gpus=4\n", "hf:1: expected 'HOST slots=N'"),
        ("# only a comment\n\n", "hf: no hosts found"),
    ],
)
def test_hostfile_errors_name_file_and_line(text, message):
    with pytest.raises(LauncherError) as err:
        parse_hostfile_text(text, source="hf")
    assert message in str(err.value)


def test_read_hostfile_missing_file_is_an_error(tmp_path):
    with pytest.raises(LauncherError, match="does not exist"):
        read_hostfile(str(tmp_path / "nope"))
    path = tmp_path / "hosts"
    path.write_text("w0 slots=2\nw0 slots=2\n")
    with pytest.raises(LauncherError, match=f"{path}:2: duplicate host 'w0'"):
        read_hostfile(str(path))


# ---------------------------------------------------------------- include / exclude
POOL = {"worker-0": 4, "worker-1": 4, "worker-2": 2}


def test_node_specs_merge_and_sort_slots():
    assert parse_node_specs("worker-1:2,0@worker-0@worker-1:2,3", "--include") == {
        "worker-1": [0, 2, 3],
        "worker-0": [],
    }
    assert parse_node_specs("w:1@w", "--include") == {"w": []}  # the whole host wins


def test_include_whole_host_and_slots_keeps_hostfile_order():
    active = select_resources(POOL, include="worker-2@worker-0:0,2")
    assert list(active.items()) == [("worker-0", [0, 2]), ("worker-2", [0, 1])]


def test_exclude_removes_slots_and_whole_hosts():
    assert select_resources(POOL, exclude="worker-1:0,3@worker-2") == {
        "worker-0": [0, 1, 2, 3],
        "worker-1": [1, 2],
    }
    assert select_resources(POOL) == {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]}


@pytest.mark.parametrize(
    "include, exclude, message",
    [
        ("worker-0", "worker-1", "mutually exclusive"),
        ("worker-9", "", "--include names host 'worker-9', which is not in the resource pool"),
        ("worker-2:2", "", "--include names slot 2 on host 'worker-2', which has slots 0,1"),
        ("", "worker-0:7", "--exclude names slot 7 on host 'worker-0'"),
        ("worker-0:x", "", "slot 'x' on host 'worker-0' is not a non-negative integer"),
        ("worker-0:", "", "slot '' on host 'worker-0'"),
        ("@worker-0", "", "empty host name"),
        ("", "worker-0@worker-1@worker-2", "leaves no slot to run on"),
    ],
)
def test_resource_filter_errors(include, exclude, message):
    with pytest.raises(LauncherError) as err:
        select_resources(POOL, include=include, exclude=exclude)
    assert message in str(err.value)


def test_num_nodes_and_procs_limit_or_fail():
    active = select_resources(POOL)
    assert limit_resources(active, 2, 3) == {"worker-0": [0, 1, 2], "worker-1": [0, 1, 2]}
    with pytest.raises(LauncherError, match="--num_nodes 4 asks for more hosts than the 3 available"):
        limit_resources(active, 4, None)
    with pytest.raises(LauncherError, match="exceeds the 2 slots of host 'worker-2'"):
        limit_resources(active, None, 3)


# ---------------------------------------------------------------- env file and exports
def test_env_file_parsing_and_errors():
    text = "# comment\n\nNCCL_IB_DISABLE=1\nA_B = x=y \nEMPTY=\n"
    assert parse_env_text(text) == {"NCCL_IB_DISABLE": "1", "A_B": "x=y", "EMPTY": ""}
    with pytest.raises(LauncherError, match=r"envf:2: expected 'NAME=value', got 'JUSTNAME'"):
        parse_env_text("A=1\nJUSTNAME\n", source="envf")
    with pytest.raises(LauncherError, match="envf:1: expected 'NAME=value'"):
        parse_env_text("1BAD=2\n", source="envf")
    with pytest.raises(LauncherError, match="without 'export'"):
        parse_env_text("export A=1\n", source="envf")


def test_env_files_are_found_in_home_then_cwd_and_cwd_wins(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / ".deepspeed_env").write_text("A=home\nB=home\n")
    (cwd / ".deepspeed_env").write_text("B=cwd\n")
    files = default_env_files(str(cwd), str(home), {})
    assert files == [str(home / ".deepspeed_env"), str(cwd / ".deepspeed_env")]
    exports = collect_exports(
        {"NCCL_DEBUG": "INFO", "HOME": "/h", "DS_X": "1", "PYTHONPATH": "/p"}, str(cwd), files
    )
    assert exports == {"A": "home", "B": "cwd", "DS_X": "1", "NCCL_DEBUG": "INFO", "PYTHONPATH": f"{cwd}:/p"}
    (cwd / "custom.env").write_text("C=1\n")
    assert default_env_files(str(cwd), str(home), {"DS_ENV_FILE": "custom.env"}) == [str(cwd / "custom.env")]
    with pytest.raises(LauncherError, match="does not exist"):
        read_env_file(str(cwd / "missing.env"))


# ---------------------------------------------------------------- commands
def _plan(**overrides) -> LaunchPlan:
    fields = dict(
        resources={"worker-0": [0, 1], "worker-1": [0, 2]},
        script="train.py",
        script_args=["--lr", "1e-3", "a b"],
        master_addr="worker-0",
        master_port=29600,
        job_id="ds-job1",
        cwd="/work dir",
        exports={"NCCL_DEBUG": "INFO", "PYTHONPATH": "/work dir"},
        python="/venv/bin/python",
    )
    fields.update(overrides)
    return LaunchPlan(**fields)


def _torchrun(nnodes, nproc, node_rank=None, rdzv=None):
    argv = [
        "/venv/bin/python",
        "-u",
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
    ]
    if node_rank is not None:
        argv += [f"--node_rank={node_rank}", "--master_addr=worker-0", "--master_port=29600"]
    if rdzv is not None:
        argv += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}"]
    return argv + ["--rdzv_id=ds-job1", WORKER_ENTRY, "train.py", "--lr", "1e-3", "a b"]


def _remote(node_rank, nproc, device=""):
    return (
        f"export NCCL_DEBUG=INFO; export PYTHONPATH='/work dir';{device} cd '/work dir' && exec "
        + shlex.join(_torchrun(2, nproc, node_rank))
    )


def test_ssh_commands_are_exact():
    cmds = ssh_commands(_plan())
    assert [c.argv for c in cmds] == [
        ["ssh", "-o", "BatchMode=yes", "worker-0", _remote(0, 2)],
        ["ssh", "-o", "BatchMode=yes", "worker-1", _remote(1, 2, " export CUDA_VISIBLE_DEVICES=0,2;")],
    ]
    ported = ssh_commands(_plan(ssh_port=2222, launcher_args=["-i", "key"]))
    assert ported[1].argv[:7] == ["ssh", "-o", "BatchMode=yes", "-p", "2222", "-i", "key"]
    assert ported[1].argv[7] == "worker-1"


def test_local_commands_run_the_ssh_remote_line_in_a_clean_shell():
    plan = _plan()
    for ssh, local in zip(ssh_commands(plan), local_commands(plan)):
        assert local.argv == ["/bin/sh", "-c", ssh.argv[-1]]
        assert local.clean_env and not ssh.clean_env


def test_pdsh_command_is_exact():
    cmd = pdsh_command(_plan(ssh_port=2222))
    chooser = (
        "case %h in worker-0) DS_LAUNCH_NODE_RANK=0; DS_LAUNCH_NPROC=2;; "
        "worker-1) DS_LAUNCH_NODE_RANK=1; DS_LAUNCH_NPROC=2; export CUDA_VISIBLE_DEVICES=0,2;; "
        '*) echo "ds-train-launch: host %h is not in this job" >&2; exit 2;; esac;'
    )
    torchrun = shlex.join(_torchrun(2, "X", "Y")).replace(
        "--nproc_per_node=X --node_rank=Y",
        "--nproc_per_node=$DS_LAUNCH_NPROC --node_rank=$DS_LAUNCH_NODE_RANK",
    )
    body = f"export NCCL_DEBUG=INFO; export PYTHONPATH='/work dir'; cd '/work dir' && exec {torchrun}"
    assert cmd.argv == ["pdsh", "-S", "-f", "1024", "-w", "worker-0,worker-1", f"{chooser} {body}"]
    assert cmd.env == {"PDSH_RCMD_TYPE": "ssh", "PDSH_SSH_ARGS_APPEND": "-p 2222"}


def test_pdsh_escapes_percent_signs_outside_the_host_chooser():
    cmd = pdsh_command(_plan(script_args=["--note=50%"]))
    assert "--note=50%%" in cmd.argv[-1] and cmd.argv[-1].count("%h") == 2


def test_slurm_command_is_exact_and_needs_even_hosts():
    plan = _plan(resources={"worker-0": [0, 1], "worker-1": [0, 1]}, launcher_args=["--partition=gpu"])
    cmd = slurm_command(plan)
    assert cmd.argv == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--nodelist=worker-0,worker-1",
        "--chdir=/work dir",
        "--export=ALL",
        "--kill-on-bad-exit=1",
        "--partition=gpu",
        *_torchrun(2, 2, rdzv="worker-0:29600"),
    ]
    assert cmd.env == {"NCCL_DEBUG": "INFO", "PYTHONPATH": "/work dir"}
    with pytest.raises(LauncherError, match="every node needs the same slots"):
        slurm_command(_plan())


def test_single_node_command_and_kill_commands():
    plan = _plan(resources={"localhost": [1, 3]}, master_addr="127.0.0.1")
    cmd = single_node_command(plan)
    assert cmd.argv[:9] == [
        "/venv/bin/python",
        "-u",
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--node_rank=0",
        "--master_addr=127.0.0.1",
        "--master_port=29600",
    ]
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "1,3"
    kills = kill_commands(_plan(), "ssh")
    assert [k.argv for k in kills] == [
        ["ssh", "-o", "BatchMode=yes", h, "pkill -TERM -f -- '[-]-rdzv_id=ds-job1'"]
        for h in ("worker-0", "worker-1")
    ]
    assert kill_commands(_plan(), "pdsh")[0].argv[:6] == [
        "pdsh",
        "-f",
        "1024",
        "-w",
        "worker-0,worker-1",
        "pkill -TERM -f -- '[-]-rdzv_id=ds-job1'",
    ]
    assert kill_commands(_plan(), "slurm") == [] and kill_commands(_plan(), "local") == []


def test_module_no_python_and_no_local_rank_flags_reach_the_worker_entry():
    cmd = single_node_command(_plan(resources={"localhost": [0]}, module=True, no_local_rank=True))
    assert cmd.argv[cmd.argv.index(WORKER_ENTRY) :] == [
        WORKER_ENTRY,
        "--no_local_rank",
        "--module",
        "train.py",
        "--lr",
        "1e-3",
        "a b",
    ]


def test_worker_entry_builds_deepspeed_argv():
    env = {"LOCAL_RANK": "3"}
    assert build_argv(["s.py", "--x"], env, "py") == ["py", "-u", "s.py", "--local_rank=3", "--x"]
    assert build_argv(["--module", "pkg.m", "--x"], env, "py") == [
        "py",
        "-u",
        "-m",
        "pkg.m",
        "--local_rank=3",
        "--x",
    ]
    assert build_argv(["--no_python", "./run.sh"], env, "py") == ["./run.sh", "--local_rank=3"]
    assert build_argv(["--no_local_rank", "s.py"], env, "py") == ["py", "-u", "s.py"]


# ---------------------------------------------------------------- CLI
def _args(*argv):
    return build_parser().parse_args(list(argv))


def test_cli_plan_with_hostfile_include_and_env_file(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=2\nw1 slots=2\n")
    env_file = tmp_path / "env"
    env_file.write_text("NCCL_SOCKET_IFNAME=eth0,eth1\n")
    args = _args(
        "-H",
        str(hostfile),
        "--include",
        "w0@w1:1",
        "--launcher",
        "ssh",
        "--env_file",
        str(env_file),
        "train.py",
        "--flag",
    )
    plan, multi = make_plan(args, {"PATH": "/bin"}, str(tmp_path))
    assert multi and plan.resources == {"w0": [0, 1], "w1": [1]} and plan.master_addr == "w0"
    assert plan.exports == {"NCCL_SOCKET_IFNAME": "eth0,eth1", "PYTHONPATH": str(tmp_path)}
    assert plan.script_args == ["--flag"]
    cmds = plan_commands(plan, multi, "ssh")
    assert "export CUDA_VISIBLE_DEVICES=1;" in cmds[1].argv[-1] and "--nproc_per_node=1" in cmds[1].argv[-1]


def test_cli_single_node_without_hostfile(tmp_path, monkeypatch):
    monkeypatch.setattr("ds_train.launcher.runner.DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    plan, multi = make_plan(_args("--num_procs", "3", "train.py"), {}, str(tmp_path))
    assert not multi and plan.resources == {"localhost": [0, 1, 2]} and plan.master_addr == "127.0.0.1"
    with pytest.raises(LauncherError, match="--num_nodes 2 needs a hostfile"):
        make_plan(_args("--num_nodes", "2", "train.py"), {}, str(tmp_path))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--launcher", "openmpi"], "--launcher openmpi is not supported"),
        (["--launcher", "rsh"], "unknown --launcher 'rsh'"),
        (["--include", "w0", "--num_procs", "1"], "cannot be combined with --include/--exclude"),
        (["--module", "--no_python"], "mutually exclusive"),
        (["--comment", "x"], "need --launcher slurm"),
        (["--node_rank", "1"], "only used with --no_ssh"),
        (["--launcher", "slurm", "--ssh_port", "22"], "--ssh_port is used by the ssh and pdsh launchers"),
        (
            ["--launcher", "local", "--launcher_args=-v"],
            "--launcher_args has no meaning for --launcher local",
        ),
        (["--no_ssh", "--node_rank", "5"], "--no_ssh needs --node_rank in [0, 1]"),
        (["--env_file", "/nonexistent/env"], "env file '/nonexistent/env' does not exist"),
    ],
)
def test_cli_rejects_bad_combinations(tmp_path, argv, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=2\nw1 slots=2\n")
    with pytest.raises(LauncherError) as err:
        make_plan(_args("-H", str(hostfile), *argv, "train.py"), {}, str(tmp_path))
    assert message in str(err.value)


def test_cli_rejects_unsupported_deepspeed_flags_by_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--autotuning", "tune", "train.py"])
    assert exit_info.value.code == 2
    assert "--autotuning is not supported by ds-train-launch" in capsys.readouterr().err


def test_cli_dry_run_prints_commands_and_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=2\nw1 slots=2\n")
    assert main(["-H", str(hostfile), "--launcher", "ssh", "--dry_run", "train.py", "--x"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# w0 (node 0)" and out[2] == "# w1 (node 1)"
    assert shlex.split(out[3])[:4] == ["ssh", "-o", "BatchMode=yes", "w1"]
    assert "--node_rank=1" in shlex.split(out[3])[4]
    hostfile.write_text("w0 slots=2\nw0 slots=2\n")
    assert main(["-H", str(hostfile), "--dry_run", "train.py"]) == 2
    assert f"{hostfile}:2: duplicate host 'w0'" in capsys.readouterr().err


def test_launcher_modules_add_no_torch_import():
    import subprocess

    code = (
        "import sys, ds_train\n"  # the package __init__ may import what it likes; the launcher adds nothing
        "before = set(sys.modules)\n"
        "import ds_train.launcher.runner\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] == 'torch'))\n"
    )
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_ssh_starts_only_this_nodes_share(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=2\nw1 slots=3\n")
    args = _args("-H", str(hostfile), "--no_ssh", "--node_rank", "1", "train.py")
    plan, multi = make_plan(args, {}, str(tmp_path))
    assert not multi and plan.master_addr == "w0"
    (command,) = plan_commands(plan, multi, args.launcher, node_rank=1)
    assert command.env == {"PYTHONPATH": str(tmp_path)}
    assert command.argv[4:9] == [
        "--nnodes=2",
        "--nproc_per_node=3",
        "--node_rank=1",
        "--master_addr=w0",
        "--master_port=29500",
    ]


def test_hostfile_rejects_names_that_could_become_options_or_shell():
    for bad in ("-oProxyCommand=touch_x", "a;b", "$(x)", "a'b"):
        with pytest.raises(LauncherError, match="is not a host name or address"):
            parse_hostfile_text(f"{bad} slots=1\n", source="hf")
    assert parse_hostfile_text("10.0.0.1 slots=1\nnode-1.cluster slots=2\n[::1] slots=1\n") == {
        "10.0.0.1": 1,
        "node-1.cluster": 2,
        "[::1]": 1,
    }


def test_one_remote_host_still_uses_the_multi_node_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\nworker-7 slots=2\n")
    plan, multi = make_plan(
        _args("-H", str(hostfile), "--include", "worker-7", "train.py"), {}, str(tmp_path)
    )
    assert multi and plan.master_addr == "worker-7"
    plan, multi = make_plan(
        _args("-H", str(hostfile), "--include", "localhost", "train.py"), {}, str(tmp_path)
    )
    assert not multi and plan.master_addr == "127.0.0.1"
    plan, multi = make_plan(
        _args("-H", str(hostfile), "--include", "localhost", "--force_multi", "train.py"), {}, str(tmp_path)
    )
    assert multi


def test_slurm_without_hostfile_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr("ds_train.launcher.runner.DEFAULT_HOSTFILE", str(tmp_path / "absent"))
    with pytest.raises(LauncherError, match="--launcher slurm needs a hostfile"):
        make_plan(_args("--launcher", "slurm", "--num_procs", "2", "train.py"), {}, str(tmp_path))
