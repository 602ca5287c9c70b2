"""Rank-aware logging: `logger` for everything, `log_dist` for messages that only some ranks should print."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

__all__ = ["logger", "get_logger", "log_dist", "get_rank_for_logging", "warn_once"]

_FORMAT = "[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"


def get_logger(name: str = "ds", level: int | None = None) -> logging.Logger:
    log = logging.getLogger(name)
    if not log.handlers and name == "ds":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
        env_level = os.environ.get("DS_LOG_LEVEL", "INFO").upper()
        log.setLevel(level or getattr(logging, env_level, logging.INFO))
    elif level is not None:
        log.setLevel(level)
    return log


logger = get_logger()


def get_rank_for_logging() -> int:
    """This process's global rank, from torch.distributed if initialized, else the launcher's env."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def log_dist(message: str, ranks: Iterable[int] | None = (0,), level: int = logging.INFO) -> None:
    """Log `message` on the given ranks only (``None`` or ``[-1]`` means every rank), prefixed by the rank."""
    rank = get_rank_for_logging()
    wanted = None if ranks is None else set(ranks)
    if wanted is None or -1 in wanted or rank in wanted:
        logger.log(level, f"[rank {rank}] {message}")


_warned: set[str] = set()


def warn_once(message: str, key: str | None = None) -> None:
    """Emit a warning the first time only (e.g. a kernel falling back to its reference)."""
    key = key or message
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)
