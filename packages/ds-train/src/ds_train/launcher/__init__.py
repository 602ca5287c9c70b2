"""The ``ds-train-launch`` launcher: DeepSpeed's launcher flags (hostfile, include/exclude,
``.deepspeed_env``, ssh/pdsh/slurm) on top of torchrun. Imports no torch. The CLI entry point is `ds_train.launcher.runner.main`."""

from ds_train.launcher.commands import Command, LaunchPlan
from ds_train.launcher.environment import collect_exports, parse_env_text
from ds_train.launcher.errors import LauncherError
from ds_train.launcher.hostfile import parse_hostfile_text, select_resources

__all__ = [
    "Command",
    "LaunchPlan",
    "LauncherError",
    "collect_exports",
    "parse_env_text",
    "parse_hostfile_text",
    "select_resources",
]
