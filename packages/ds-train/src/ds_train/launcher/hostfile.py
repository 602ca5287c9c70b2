"""DeepSpeed's resource conventions: the hostfile (``host slots=N``) and ``--include``/``--exclude``.

A resource pool maps each host to its slots (device indices ``0..N-1``). The active resources are
that pool after filtering: host -> the slot indices this job uses there, in hostfile order (the
order fixes the node ranks, so node 0 is the first host left).
"""

from __future__ import annotations

import os
import re

from ds_train.launcher.errors import LauncherError

_HOST_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")
# Names and addresses only: a host becomes an ssh/pdsh/srun argument, so "-oProxyCommand=..." or
# shell syntax must never get that far.
_HOST_NAME = re.compile(r"^[A-Za-z0-9_.:\[\]][A-Za-z0-9_.:\[\]%-]*$")


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse hostfile ``text`` into ``{host: slots}`` (insertion ordered).

    Lines are ``host slots=N``; ``#`` starts a comment (whole line or trailing); blank lines are
    skipped. A malformed line, ``slots`` < 1, a duplicate host or no host at all is an error naming
    ``source`` and the line number.
    """
    pool: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise LauncherError(f"{source}:{lineno}: expected 'HOST slots=N', got {raw.strip()!r}")
        host, slots_text = match.group("host"), match.group("slots")
        if not _HOST_NAME.match(host):
            raise LauncherError(f"{source}:{lineno}: {host!r} is not a host name or address")
        try:
            slots = int(slots_text)
        except ValueError:
            raise LauncherError(
                f"{source}:{lineno}: slots must be an integer, got 'slots={slots_text}'"
            ) from None
        if slots < 1:
            raise LauncherError(f"{source}:{lineno}: host {host!r} has slots={slots}; need slots >= 1")
        if host in pool:
            raise LauncherError(
                f"{source}:{lineno}: duplicate host {host!r} (first listed on line {first_line[host]})"
            )
        pool[host] = slots
        first_line[host] = lineno
    if not pool:
        raise LauncherError(f"{source}: no hosts found; expected lines like 'worker-0 slots=4'")
    return pool


def read_hostfile(path: str) -> dict[str, int]:
    """Read and parse the hostfile at ``path`` (see `parse_hostfile_text`)."""
    if not os.path.isfile(path):
        raise LauncherError(f"hostfile {path!r} does not exist")
    with open(path, encoding="utf-8") as handle:
        return parse_hostfile_text(handle.read(), source=path)


def parse_node_specs(spec: str, flag: str) -> dict[str, list[int]]:
    """Parse ``NODE_SPEC[@NODE_SPEC ...]`` with ``NODE_SPEC = NAME[:SLOT[,SLOT ...]]``.

    Returns ``{host: sorted unique slots}``; an empty slot list means "the whole host".
    """
    result: dict[str, list[int]] = {}
    for node_spec in spec.split("@"):
        name, sep, slot_text = node_spec.partition(":")
        name = name.strip()
        if not name:
            raise LauncherError(f"{flag} {spec!r}: empty host name in {node_spec!r}")
        slots: list[int] = []
        if sep:
            for item in slot_text.split(","):
                item = item.strip()
                if not item.isdigit():
                    raise LauncherError(
                        f"{flag} {spec!r}: slot {item!r} on host {name!r} is not a non-negative integer"
                    )
                slots.append(int(item))
        whole_host = name in result and not result[name]
        if whole_host or (name in result and not slots):
            result[name] = []  # the whole host was named, which covers any slot list
        else:
            result[name] = sorted(set(result.get(name, []) + slots))
    return result


def _check_known(pool: dict[str, list[int]], specs: dict[str, list[int]], flag: str) -> None:
    for host, slots in specs.items():
        if host not in pool:
            raise LauncherError(
                f"{flag} names host {host!r}, which is not in the resource pool (hosts: {', '.join(pool)})"
            )
        for slot in slots:
            if slot not in pool[host]:
                raise LauncherError(
                    f"{flag} names slot {slot} on host {host!r}, which has slots "
                    f"{','.join(map(str, pool[host]))}"
                )


def select_resources(pool: dict[str, int], include: str = "", exclude: str = "") -> dict[str, list[int]]:
    """Apply ``--include`` or ``--exclude`` to ``pool`` and return the active resources.

    Hosts keep the pool's order; hosts left with no slot are dropped. Naming an unknown host or slot,
    giving both filters, or filtering everything away is an error.
    """
    full = {host: list(range(slots)) for host, slots in pool.items()}
    if include and exclude:
        raise LauncherError("--include and --exclude are mutually exclusive; give only one")
    if not include and not exclude:
        return full
    flag, spec = ("--include", include) if include else ("--exclude", exclude)
    specs = parse_node_specs(spec, flag)
    _check_known(full, specs, flag)
    active: dict[str, list[int]] = {}
    for host, slots in full.items():
        if include:
            if host in specs:
                active[host] = specs[host] or slots
        else:
            dropped = set(specs[host] or slots) if host in specs else set()
            kept = [s for s in slots if s not in dropped]
            if kept:
                active[host] = kept
    if not active:
        raise LauncherError(f"{flag} {spec!r} leaves no slot to run on")
    return active


def limit_resources(
    active: dict[str, list[int]], num_nodes: int | None, procs_per_node: int | None
) -> dict[str, list[int]]:
    """Keep the first ``num_nodes`` hosts and the first ``procs_per_node`` slots of each (DeepSpeed's
    ``--num_nodes``/``--num_gpus``). Asking for more than is there is an error."""
    hosts = list(active)
    if num_nodes is not None:
        if num_nodes < 1:
            raise LauncherError(f"--num_nodes must be >= 1, got {num_nodes}")
        if num_nodes > len(hosts):
            raise LauncherError(
                f"--num_nodes {num_nodes} asks for more hosts than the {len(hosts)} available "
                f"({', '.join(hosts)})"
            )
        hosts = hosts[:num_nodes]
    limited: dict[str, list[int]] = {}
    for host in hosts:
        slots = active[host]
        if procs_per_node is not None:
            if procs_per_node < 1:
                raise LauncherError(f"--num_procs/--num_gpus must be >= 1, got {procs_per_node}")
            if procs_per_node > len(slots):
                raise LauncherError(
                    f"--num_procs/--num_gpus {procs_per_node} exceeds the {len(slots)} slots of host {host!r}"
                )
            slots = slots[:procs_per_node]
        limited[host] = slots
    return limited
