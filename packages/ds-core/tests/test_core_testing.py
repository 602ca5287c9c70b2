"""The worker pool itself: results per rank, one error with every failing rank, recovery after a hang."""
import pytest
import torch
from ds_core import comm
from ds_core.testing import DistributedTestError, run_distributed


def _rank_and_sum(offset):
    t = torch.tensor([comm.get_rank() + offset], dtype=torch.float32)
    comm.all_reduce(t)
    return comm.get_rank(), t.item()


def _fail_on_odd_ranks():
    if comm.get_rank() % 2:
        raise ValueError(f"bad input on rank {comm.get_rank()}")
    return "fine"


def _hang_on_rank_one():
    if comm.get_rank() == 1:
        import time

        time.sleep(60)
    return "done"


def test_results_come_back_in_rank_order():
    assert run_distributed(_rank_and_sum, 2, 10) == [(0, 21.0), (1, 21.0)]


def test_an_error_names_the_rank_and_the_pool_still_works():
    with pytest.raises(DistributedTestError, match=r"rank 1: ValueError: bad input on rank 1"):
        run_distributed(_fail_on_odd_ranks, 2)
    assert run_distributed(_rank_and_sum, 2, 0) == [(0, 1.0), (1, 1.0)]


def test_a_hang_is_cut_off_and_the_pool_rebuilt():
    with pytest.raises(DistributedTestError, match="gave no result within 3 s"):
        run_distributed(_hang_on_rank_one, 2, timeout=3)
    assert run_distributed(_rank_and_sum, 2, 1) == [(0, 3.0), (1, 3.0)]
