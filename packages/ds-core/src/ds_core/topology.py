"""Named process topologies (pipe, data, tensor, expert, sequence) and their process groups.

A topology maps each global rank to coordinates on named axes, in row-major order (the last axis varies
fastest, so ranks next to each other share the outer coordinates), as DeepSpeed's ProcessTopology does.
`build_groups` creates, for every axis, one process group per line of ranks along that axis.
"""
from __future__ import annotations

import itertools
import math
from collections import namedtuple
from collections.abc import Sequence
from typing import Any

KNOWN_AXES = ("pipe", "data", "tensor", "expert", "sequence", "model")


class TopologyError(ValueError):
    pass


class ProcessTopology:
    """Ranks laid out on a grid of named axes: ``ProcessTopology(["pipe", "data", "tensor"], [2, 2, 2])``."""

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        axes, dims = list(axes), [int(d) for d in dims]
        if len(axes) != len(dims):
            raise TopologyError(f"{len(axes)} axes {axes} but {len(dims)} sizes {dims}")
        if len(set(axes)) != len(axes):
            raise TopologyError(f"axis names repeat: {axes}")
        for axis, dim in zip(axes, dims, strict=False):
            if dim < 1:
                raise TopologyError(f"axis '{axis}' has size {dim}; sizes must be >= 1")
        self.axes = axes
        self.dims = dims
        self.ProcessCoord = namedtuple("ProcessCoord", axes)  # noqa: N806 - a type
        self._coord_to_rank: dict[tuple[int, ...], int] = {}
        for rank, coord in enumerate(itertools.product(*[range(d) for d in dims])):
            self._coord_to_rank[coord] = rank
        self._rank_to_coord = {r: c for c, r in self._coord_to_rank.items()}

    def world_size(self) -> int:
        return math.prod(self.dims)

    def get_dim(self, axis: str) -> int:
        return self.dims[self._axis_index(axis)] if axis in self.axes else 1

    def _axis_index(self, axis: str) -> int:
        try:
            return self.axes.index(axis)
        except ValueError:
            raise TopologyError(f"no axis '{axis}' in topology {self.axes}") from None

    def get_coord(self, rank: int) -> Any:
        if rank not in self._rank_to_coord:
            raise TopologyError(f"rank {rank} outside world size {self.world_size()}")
        return self.ProcessCoord(*self._rank_to_coord[rank])

    def get_rank(self, **coords: int) -> int:
        if set(coords) != set(self.axes):
            raise TopologyError(f"get_rank needs every axis {self.axes}, got {sorted(coords)}")
        return self._coord_to_rank[tuple(coords[a] for a in self.axes)]

    def filter_match(self, **coords: int) -> list[int]:
        """Ranks whose coordinates equal the given ones (others free), in rank order."""
        idx = {self._axis_index(a): v for a, v in coords.items()}
        return [r for r, c in sorted(self._rank_to_coord.items()) if all(c[i] == v for i, v in idx.items())]

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """Ranks at position `idx` along `axis`."""
        return self.filter_match(**{axis: idx})

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """Lines of ranks that differ only along `axis`: one process group each."""
        if axis not in self.axes:
            return []
        i = self._axis_index(axis)
        others = [range(d) for j, d in enumerate(self.dims) if j != i]
        lists = []
        for fixed in itertools.product(*others):
            line = []
            for k in range(self.dims[i]):
                coord = list(fixed)
                coord.insert(i, k)
                line.append(self._coord_to_rank[tuple(coord)])
            lists.append(line)
        return lists

    def __repr__(self) -> str:
        return "ProcessTopology(" + ", ".join(f"{a}={d}" for a, d in zip(self.axes, self.dims, strict=False)) + ")"


def PipeModelDataParallelTopology(num_pp: int, num_mp: int, num_dp: int) -> ProcessTopology:  # noqa: N802
    """DeepSpeed's 3D layout: pipe outermost, then data, then tensor (model) innermost."""
    return ProcessTopology(["pipe", "data", "tensor"], [num_pp, num_dp, num_mp])


def make_topology(world_size: int, **sizes: int) -> ProcessTopology:
    """A topology from axis sizes; `data` takes what is left. ``make_topology(8, pipe=2, tensor=2)``."""
    order = ["pipe", "data", "expert", "sequence", "tensor"]
    unknown = set(sizes) - set(order)
    if unknown:
        raise TopologyError(f"unknown axes {sorted(unknown)}; known: {order}")
    fixed = math.prod(v for k, v in sizes.items() if k != "data")
    if "data" not in sizes:
        if world_size % fixed:
            raise TopologyError(f"world size {world_size} is not divisible by the product of {sizes} = {fixed}")
        sizes["data"] = world_size // fixed
    axes = [a for a in order if a in sizes]
    dims = [sizes[a] for a in axes]
    topo = ProcessTopology(axes, dims)
    if topo.world_size() != world_size:
        raise TopologyError(
            f"axis sizes {dict(zip(axes, dims, strict=False))} multiply to {topo.world_size()}, but the world size is {world_size}"
        )
    return topo


class ProcessGroups:
    """This rank's process group along each axis of a topology."""

    def __init__(self, topology: ProcessTopology, rank: int, groups: dict[str, Any], members: dict[str, list[int]]):
        self.topology = topology
        self.rank = rank
        self._groups = groups
        self._members = members

    def get_group(self, axis: str) -> Any:
        if axis not in self._groups:
            raise TopologyError(f"no '{axis}' group; topology axes are {self.topology.axes}")
        return self._groups[axis]

    def ranks(self, axis: str) -> list[int]:
        return list(self._members[axis])

    def get_world_size(self, axis: str) -> int:
        return len(self._members[axis]) if axis in self._members else 1

    def get_rank(self, axis: str) -> int:
        return self._members[axis].index(self.rank) if axis in self._members else 0


def build_groups(topology: ProcessTopology, rank: int | None = None) -> ProcessGroups:
    """Create every axis's process groups (collectively: all ranks must call this in the same order)."""
    from ds_core import comm

    world = comm.get_world_size()
    if topology.world_size() != world:
        raise TopologyError(f"{topology} has {topology.world_size()} ranks but the job has {world}")
    me = comm.get_rank() if rank is None else rank
    groups, members = {}, {}
    for axis in topology.axes:
        for line in topology.get_axis_comm_lists(axis):
            group = comm.new_group(line)
            if me in line:
                groups[axis], members[axis] = group, line
    return ProcessGroups(topology, me, groups, members)
