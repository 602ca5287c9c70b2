"""The one error type the launcher raises for bad input (a hostfile, a filter, an env file, a flag)."""

from __future__ import annotations


class LauncherError(ValueError):
    """Bad launcher input. The message names the file and line, or the flag, and what to do."""
