"""Every ds_core.comm collective on real gloo processes (world size 2 and 4, fp32 and bf16), native and
fallback paths, sync and async, each checked against a reference computed locally from every rank's input."""
import pytest
import torch
from ds_core import comm
from ds_core.testing import run_distributed

DTYPES = [torch.float32, torch.bfloat16]


def _input(rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    # Small integers: exact in bf16 after a few sums, so comparisons can be exact.
    return (torch.arange(n, dtype=torch.float32) % 7 + rank + 1).to(dtype)


def _check_all_collectives(async_op: bool, fallback: bool) -> dict:
    rank, world = comm.get_rank(), comm.get_world_size()
    comm.force_fallback(
        ["all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor", "all_gather",
         "broadcast", "all_to_all_single", "all_to_all"] if fallback else None)
    comm.comms_logger.configure(enabled=True)
    n = 4 * world
    for dtype in DTYPES:
        inputs = [_input(r, n, dtype) for r in range(world)]
        mine = inputs[rank].clone()

        def done(work):
            if async_op:
                assert work is not None
                work.wait()
            else:
                assert work is None

        # all_reduce SUM, MAX, AVG (AVG is emulated on gloo)
        t = mine.clone()
        done(comm.all_reduce(t, async_op=async_op))
        assert torch.equal(t, torch.stack(inputs).sum(0)), (dtype, "all_reduce")
        t = mine.clone()
        done(comm.all_reduce(t, op=comm.ReduceOp.MAX, async_op=async_op))
        assert torch.equal(t, torch.stack(inputs).amax(0))
        t = mine.clone().float()
        done(comm.all_reduce(t, op=comm.ReduceOp.AVG, async_op=async_op))
        assert torch.allclose(t, torch.stack([i.float() for i in inputs]).mean(0))

        # reduce-scatter, flat and list forms
        out = torch.empty(n // world, dtype=dtype)
        done(comm.reduce_scatter_tensor(out, mine.clone(), async_op=async_op))
        assert torch.equal(out, torch.stack(inputs).sum(0).view(world, -1)[rank])
        out = torch.empty(n // world, dtype=dtype)
        done(comm.reduce_scatter(out, list(mine.clone().chunk(world)), async_op=async_op))
        assert torch.equal(out, torch.stack(inputs).sum(0).view(world, -1)[rank])

        # all-gather into one tensor and into a list
        out = torch.empty(n * world, dtype=dtype)
        done(comm.all_gather_into_tensor(out, mine, async_op=async_op))
        assert torch.equal(out, torch.cat(inputs))
        outs = [torch.empty(n, dtype=dtype) for _ in range(world)]
        done(comm.all_gather(outs, mine, async_op=async_op))
        assert all(torch.equal(o, i) for o, i in zip(outs, inputs))

        # broadcast from the last rank
        t = mine.clone()
        done(comm.broadcast(t, src=world - 1, async_op=async_op))
        assert torch.equal(t, inputs[world - 1])

        # all-to-all: equal splits, uneven splits, and list form
        out = torch.empty(n, dtype=dtype)
        done(comm.all_to_all_single(out, mine, async_op=async_op))
        expect = torch.cat([inputs[src].view(world, -1)[rank] for src in range(world)])
        assert torch.equal(out, expect)
        # rank r sends (dst + 1) rows to each dst; receives (rank + 1) rows from each src
        send_sizes = [d + 1 for d in range(world)]
        x = torch.cat([torch.full((d + 1, 2), float(rank * 10 + d)) for d in range(world)]).to(dtype)
        out = torch.empty((world * (rank + 1), 2), dtype=dtype)
        done(comm.all_to_all_single(out, x, output_split_sizes=[rank + 1] * world, input_split_sizes=send_sizes,
                                    async_op=async_op))
        expect = torch.cat([torch.full((rank + 1, 2), float(src * 10 + rank)) for src in range(world)]).to(dtype)
        assert torch.equal(out, expect)
        outs = [torch.empty(3, dtype=dtype) for _ in range(world)]
        ins = [torch.full((3,), float(rank * 100 + d)).to(dtype) for d in range(world)]
        done(comm.all_to_all(outs, ins, async_op=async_op))
        assert all(torch.equal(o, torch.full((3,), float(src * 100 + rank)).to(dtype)) for src, o in enumerate(outs))

    # point to point: a ring with send/recv, then isend/irecv, then a batch
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    got = torch.empty(5)
    if rank % 2 == 0:
        comm.send(torch.full((5,), float(rank)), nxt)
        comm.recv(got, prv)
    else:
        comm.recv(got, prv)
        comm.send(torch.full((5,), float(rank)), nxt)
    assert torch.equal(got, torch.full((5,), float(prv)))
    got = torch.empty(5)
    works = [comm.isend(torch.full((5,), float(rank + 1)), nxt), comm.irecv(got, prv)]
    for w in works:
        w.wait()
    assert torch.equal(got, torch.full((5,), float(prv + 1)))
    got = torch.empty(5)
    ops = [comm.P2POp(torch.distributed.isend, torch.full((5,), float(rank + 2)), nxt),
           comm.P2POp(torch.distributed.irecv, got, prv)]
    for w in comm.batch_isend_irecv(ops):
        w.wait()
    assert torch.equal(got, torch.full((5,), float(prv + 2)))
    comm.barrier()
    return comm.comms_logger.totals()


@pytest.mark.parametrize("world_size", [2, 4])
def test_collectives_match_local_reference_sync_and_async(world_size):
    for async_op in (False, True):
        totals = run_distributed(_check_all_collectives, world_size, async_op, False)
        # the logger saw every op: all_reduce x3 per dtype (AVG goes through SUM, logged as all_reduce)
        assert totals[0]["all_reduce"]["count"] == 3 * len(DTYPES)
        assert totals[0]["all_gather_into_tensor"]["bytes"] == sum(
            4 * world_size * world_size * torch.empty(0, dtype=d).element_size() for d in DTYPES)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fallback_paths_match_local_reference(world_size):
    run_distributed(_check_all_collectives, world_size, False, True)


def test_comms_logger_summary_has_a_row_per_op():
    log = comm.CommsLogger()
    log.configure(enabled=True)
    log.record("all_reduce", 1000, 0.001)
    log.record("all_reduce", 3000, 0.002)
    assert log.totals() == {"all_reduce": {"count": 2, "bytes": 4000, "ms": pytest.approx(3.0)}}
    assert "all_reduce" in log.summary()
    log.configure(enabled=False)
    assert not log.wants("all_reduce")


def _prefers_point_to_point() -> bool:
    return comm.prefers_point_to_point()


def test_prefers_point_to_point_on_gloo_only() -> None:
    """gloo's reduce-scatter/all-gather are slower than sends/broadcasts
    (tools/bench/bench_gloo_collectives.py): the ZeRO strategies ask this to choose."""
    assert not comm.prefers_point_to_point()  # no process group in this process
    assert run_distributed(_prefers_point_to_point, 2) == [True, True]


def _gather_by_broadcast(async_op: bool) -> tuple[list[float], dict]:
    rank, world = comm.get_rank(), comm.get_world_size()
    out = torch.zeros(world * 3)
    out[rank * 3 : (rank + 1) * 3] = torch.arange(3) + 10.0 * rank
    comm.comms_logger.configure(enabled=True)
    comm.comms_logger.reset()
    work = comm.all_gather_by_broadcast(out, async_op=async_op)
    if async_op:
        work.wait()
    totals = comm.comms_logger.totals()
    comm.comms_logger.configure(enabled=False)
    return out.tolist(), {op: rec["count"] for op, rec in totals.items()}


@pytest.mark.parametrize("async_op", [False, True])
def test_all_gather_by_broadcast_matches_all_gather(async_op: bool) -> None:
    want = [float(v + 10 * r) for r in range(3) for v in range(3)]
    for got, ops in run_distributed(_gather_by_broadcast, 3, async_op):
        assert got == want
        assert ops == {"broadcast": 3}  # logged as what it is, one broadcast per rank
    for message in run_distributed(_bad_split, 2):
        assert "5 elements do not split into 2 pieces" in message


def _reduce_scatter_by_sends(async_op: bool, reuse: bool, dtype: torch.dtype) -> tuple:
    rank, world = comm.get_rank(), comm.get_world_size()
    buf = (torch.arange(world * 4, dtype=torch.float32) * (rank + 1)).to(dtype)
    before = buf.clone()
    received = torch.full(((world - 1) * 4,), float("nan"), dtype=dtype) if reuse else None
    comm.comms_logger.configure(enabled=True)
    comm.comms_logger.reset()
    work = comm.reduce_scatter_by_sends(buf, async_op=async_op, received=received)
    if async_op:
        work.wait()
    totals = comm.comms_logger.totals()
    comm.comms_logger.configure(enabled=False)
    mine = slice(rank * 4, (rank + 1) * 4)
    others_untouched = torch.equal(torch.cat([buf[: mine.start], buf[mine.stop :]]),
                                   torch.cat([before[: mine.start], before[mine.stop :]]))
    return buf[mine].float().tolist(), others_untouched, {op: rec["count"] for op, rec in totals.items()}


@pytest.mark.parametrize("async_op,reuse,dtype", [(False, False, torch.float32), (True, True, torch.float32),
                                                  (True, False, torch.bfloat16)])
def test_reduce_scatter_by_sends_matches_reduce_scatter(async_op: bool, reuse: bool, dtype: torch.dtype) -> None:
    world = 3
    total = sum(r + 1 for r in range(world))  # every rank's buffer is arange * (rank + 1)
    for rank, (piece, others_untouched, ops) in enumerate(run_distributed(_reduce_scatter_by_sends, world,
                                                                          async_op, reuse, dtype)):
        assert piece == [float(v * total) for v in range(rank * 4, (rank + 1) * 4)]
        assert others_untouched  # only this rank's piece is written
        assert ops == {"reduce_scatter_by_sends": 1}


def _bad_buffers() -> list[str]:
    messages = []
    for buffer, received in ((torch.zeros(4), torch.zeros(3)), (torch.zeros(4, 2).t(), None)):
        try:
            comm.reduce_scatter_by_sends(buffer, received=received)
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_reduce_scatter_by_sends_rejects_a_wrong_buffer() -> None:
    for wrong_received, not_contiguous in run_distributed(_bad_buffers, 2):
        assert "`received` must hold 1 x 2" in wrong_received
        assert "must be contiguous" in not_contiguous


def _bad_split() -> str:
    try:
        comm.all_gather_by_broadcast(torch.zeros(5))
    except ValueError as exc:
        return str(exc)
    return "no error"
