"""Per-process entry that torchrun starts in front of the user's script.

torchrun only sets environment variables; DeepSpeed scripts also expect ``--local_rank=N`` as their
first argument and the ``LOCAL_SIZE``/``CROSS_RANK``/``CROSS_SIZE`` variables DeepSpeed's launcher
sets. This file adds them and then *replaces itself* (exec) with the user's program, so the process
torchrun watches and signals is the user's process.

It is run by path (``python -u .../worker_entry.py``), never imported as part of ``ds_train``, so it
imports nothing but the standard library: it costs a few milliseconds, not a torch import.

Usage: ``worker_entry.py [--no_local_rank] [--module | --no_python] TARGET [ARGS...]``
"""

from __future__ import annotations

import os
import sys


def build_argv(argv: list[str], environ: dict[str, str], python: str) -> list[str]:
    """The argv to exec for ``argv`` (this file's arguments) under ``environ``."""
    add_local_rank = True
    mode = "script"
    rest = list(argv)
    while rest and rest[0] in ("--no_local_rank", "--module", "--no_python"):
        flag = rest.pop(0)
        if flag == "--no_local_rank":
            add_local_rank = False
        else:
            mode = flag[2:]
    if not rest:
        raise SystemExit("worker_entry.py: no script given")
    target, user_args = rest[0], rest[1:]
    extra = [f"--local_rank={environ['LOCAL_RANK']}"] if add_local_rank else []
    if mode == "no_python":
        return [target, *extra, *user_args]
    if mode == "module":
        return [python, "-u", "-m", target, *extra, *user_args]
    return [python, "-u", target, *extra, *user_args]


def main() -> None:
    environ = dict(os.environ)
    if "LOCAL_RANK" not in environ:
        raise SystemExit("worker_entry.py must be started by torchrun (LOCAL_RANK is not set)")
    # DeepSpeed's launcher sets these three as well; scripts written for it read them.
    os.environ.setdefault("LOCAL_SIZE", environ.get("LOCAL_WORLD_SIZE", ""))
    os.environ.setdefault("CROSS_RANK", environ.get("GROUP_RANK", ""))
    os.environ.setdefault("CROSS_SIZE", environ.get("GROUP_WORLD_SIZE", ""))
    argv = build_argv(sys.argv[1:], environ, sys.executable)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
