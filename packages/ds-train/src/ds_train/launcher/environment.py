"""What the launcher exports to every node: selected variables of this environment plus the
``.deepspeed_env`` file (``NAME=value`` lines), as DeepSpeed does."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from ds_train.launcher.errors import LauncherError

# DeepSpeed forwards every variable whose name starts with one of these (its EXPORT_ENVS plus the
# CUDA accelerator's NCCL); DS_ covers this project's own switches (DS_ACCELERATOR, DS_DIST_TIMEOUT_S...).
EXPORT_PREFIXES: tuple[str, ...] = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL", "DS_")
ENV_FILE_NAME = ".deepspeed_env"
ENV_FILE_NAME_VAR = "DS_ENV_FILE"  # DeepSpeed's override of the file's name
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env_text(text: str, source: str = "<env file>") -> dict[str, str]:
    """Parse ``NAME=value`` lines. Blank lines and ``#`` comment lines are skipped; the value is
    everything after the first ``=`` with surrounding whitespace removed (kept verbatim otherwise,
    so ``A=x=y`` gives ``x=y``). A line without ``=`` or with an invalid name is an error."""
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if line.startswith("export "):
            raise LauncherError(f"{source}:{lineno}: write 'NAME=value' without 'export', got {line!r}")
        if not sep or not _NAME.match(name):
            raise LauncherError(f"{source}:{lineno}: expected 'NAME=value', got {line!r}")
        result[name] = value.strip()
    return result


def read_env_file(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        raise LauncherError(f"env file {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        return parse_env_text(handle.read(), source=path)


def default_env_files(cwd: str, home: str, environ: Mapping[str, str]) -> list[str]:
    """The ``.deepspeed_env`` files that exist, in the order DeepSpeed reads them: ``$HOME`` first,
    then the working directory (whose values win). ``$DS_ENV_FILE`` renames the file."""
    name = environ.get(ENV_FILE_NAME_VAR, ENV_FILE_NAME)
    found: list[str] = []
    for directory in (home, cwd):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.path.realpath(path) not in map(os.path.realpath, found):
            found.append(path)
    return found


def collect_exports(
    environ: Mapping[str, str],
    cwd: str,
    env_files: list[str],
    prefixes: tuple[str, ...] = EXPORT_PREFIXES,
) -> dict[str, str]:
    """The variables to export to every node, name-sorted for stable commands.

    ``PYTHONPATH`` gets ``cwd`` prepended (DeepSpeed does this so the remote side finds the user's
    modules); variables whose names start with ``prefixes`` are forwarded; the env files are read in
    order and override what came before."""
    exports = {
        name: value for name, value in environ.items() if name.startswith(prefixes) and _NAME.match(name)
    }
    existing = environ.get("PYTHONPATH")
    exports["PYTHONPATH"] = f"{cwd}:{existing}" if existing else cwd
    for path in env_files:
        exports.update(read_env_file(path))
    return dict(sorted(exports.items()))
