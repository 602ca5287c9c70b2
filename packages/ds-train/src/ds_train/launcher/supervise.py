"""Run the launch commands, wait for them, and stop everything cleanly.

Each command starts in its own session, so a terminal's Ctrl-C reaches only the launcher, which then
decides: SIGTERM to every child's process group (torchrun catches it and stops its workers), the
remote kill commands for ssh/pdsh, then SIGKILL after a grace period. When one command fails the
others are stopped the same way, since their workers would otherwise wait for the dead peers until
the collective timeout. The exit status is the first failure's, or 128+signal when interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from ds_train.launcher.commands import LOCAL_BASE_ENV, Command

POLL_S = 0.1
KILL_COMMAND_TIMEOUT_S = 20.0


def _log(message: str) -> None:
    print(f"[ds-train-launch] {message}", file=sys.stderr, flush=True)


def command_env(command: Command, environ: Mapping[str, str]) -> dict[str, str]:
    base = {k: environ[k] for k in LOCAL_BASE_ENV if k in environ} if command.clean_env else dict(environ)
    base.update(command.env)
    return base


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(
    procs: list[subprocess.Popen], kill_commands: list[Command], environ: Mapping[str, str], grace_s: float
) -> None:
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        _signal_group(proc, signal.SIGTERM)
    for command in kill_commands:
        try:
            subprocess.run(
                command.argv,
                env=command_env(command, environ),
                timeout=KILL_COMMAND_TIMEOUT_S,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _log(f"could not run {command.label}: {exc}")
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in running):
        time.sleep(POLL_S)
    for proc in running:
        if proc.poll() is None:
            _log(f"pid {proc.pid} ignored SIGTERM for {grace_s:.0f}s; sending SIGKILL")
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def supervise(
    commands: list[Command],
    kill_commands: list[Command] | None = None,
    environ: Mapping[str, str] | None = None,
    grace_s: float = 30.0,
) -> int:
    """Start ``commands`` together and return the job's exit status (0 when all succeed)."""
    environ = os.environ if environ is None else environ
    kill_commands = kill_commands or []
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[subprocess.Popen] = []
    try:
        for command in commands:
            procs.append(
                subprocess.Popen(command.argv, env=command_env(command, environ), start_new_session=True)
            )
        status = 0
        while True:
            if received:
                _log(f"received {signal.Signals(received[0]).name}; stopping all processes")
                _stop(procs, kill_commands, environ, grace_s)
                return 128 + received[0]
            codes = [p.poll() for p in procs]
            failed = [(c, cmd) for c, cmd in zip(codes, commands) if c not in (None, 0)]
            if failed:
                status, command = failed[0]
                if any(c is None for c in codes):
                    _log(f"{command.label} exited with status {status}; stopping the others")
                    _stop(procs, kill_commands, environ, grace_s)
                return status if status > 0 else 128 - status  # a negative code is a signal
            if all(c == 0 for c in codes):
                return status
            time.sleep(POLL_S)
    except BaseException:
        _stop(procs, kill_commands, environ, grace_s)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
