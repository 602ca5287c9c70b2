"""Topologies: coordinates and group membership for 1-, 2- and 3-axis layouts, bad products rejected,
real process groups along each axis, and a 1,024-rank plan checked with torch's fake backend."""
import json
import subprocess
import sys

import pytest
import torch
from ds_core import comm
from ds_core.testing import run_distributed
from ds_core.topology import (
    PipeModelDataParallelTopology,
    ProcessTopology,
    TopologyError,
    build_groups,
    make_topology,
)


def test_one_axis():
    topo = ProcessTopology(["data"], [4])
    assert topo.get_axis_comm_lists("data") == [[0, 1, 2, 3]]
    assert topo.get_coord(2).data == 2
    assert topo.get_axis_comm_lists("pipe") == []


def test_two_by_two():
    topo = ProcessTopology(["data", "tensor"], [2, 2])
    assert topo.get_axis_comm_lists("tensor") == [[0, 1], [2, 3]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3]]
    assert topo.get_rank(data=1, tensor=0) == 2
    assert tuple(topo.get_coord(3)) == (1, 1)


def test_two_by_two_by_two_like_deepspeed():
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    assert topo.axes == ["pipe", "data", "tensor"]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.filter_match(pipe=1, tensor=0) == [4, 6]
    # every rank is in exactly one group per axis
    for axis in topo.axes:
        flat = sorted(r for line in topo.get_axis_comm_lists(axis) for r in line)
        assert flat == list(range(8))


def test_bad_products_are_rejected():
    with pytest.raises(TopologyError, match="not divisible"):
        make_topology(6, tensor=4)
    with pytest.raises(TopologyError, match=r"multiply to 8, but the world size is 6"):
        make_topology(6, data=2, tensor=4)
    with pytest.raises(TopologyError, match="sizes must be >= 1"):
        ProcessTopology(["data"], [0])
    with pytest.raises(TopologyError, match="2 axes"):
        ProcessTopology(["data", "tensor"], [2])
    assert make_topology(8, pipe=2, tensor=2).get_dim("data") == 2


def _groups_along_axes():
    topo = make_topology(comm.get_world_size(), tensor=2)
    groups = build_groups(topo)
    out = {}
    for axis in ("data", "tensor"):
        t = torch.tensor([float(comm.get_rank())])
        comm.all_reduce(t, group=groups.get_group(axis))
        out[axis] = (t.item(), groups.ranks(axis), groups.get_rank(axis))
    return out


def test_real_groups_reduce_along_each_axis():
    results = run_distributed(_groups_along_axes, 4)
    # layout data x tensor = 2 x 2: tensor groups [0,1],[2,3]; data groups [0,2],[1,3]
    assert [r["tensor"][0] for r in results] == [1.0, 1.0, 5.0, 5.0]
    assert [r["data"][0] for r in results] == [2.0, 4.0, 2.0, 4.0]
    assert results[3]["tensor"][1:] == ([2, 3], 1)


_FAKE_CHILD = """
import json, sys, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from ds_core.topology import build_groups, make_topology
rank, world = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
topo = make_topology(world, pipe=4, tensor=8, expert=2)
groups = build_groups(topo)
out = {axis: dist.get_process_group_ranks(groups.get_group(axis)) for axis in topo.axes}
print(json.dumps({"coord": list(topo.get_coord(rank)), "axes": topo.axes, "groups": out}))
"""


def test_plan_for_1024_ranks_with_fake_backend():
    world = 1024
    sampled = [0, 517, 1023]
    procs = [subprocess.Popen([sys.executable, "-c", _FAKE_CHILD, str(r), str(world)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in sampled]
    topo = make_topology(world, pipe=4, tensor=8, expert=2)
    for rank, proc in zip(sampled, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        rec = json.loads(out.strip().splitlines()[-1])
        assert rec["axes"] == ["pipe", "data", "expert", "tensor"]
        for axis, members in rec["groups"].items():
            assert rank in members
            assert len(members) == topo.get_dim(axis)
            # members differ from this rank only along `axis`
            mine = topo.get_coord(rank)
            for other in members:
                c = topo.get_coord(other)
                assert all(getattr(c, a) == getattr(mine, a) for a in topo.axes if a != axis)
            # and the whole world sees the same line for this rank
            assert members in topo.get_axis_comm_lists(axis)
