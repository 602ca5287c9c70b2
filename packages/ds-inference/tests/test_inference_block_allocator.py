"""The KV block allocator under load: no leaks, waiting instead of corruption, prefix sharing."""

from __future__ import annotations

import random

import pytest
from ds_inference.serving import LLMEngine, SamplingParams
from ds_inference.serving.block_manager import BlockManager
from ds_inference.serving.sequence import Sequence
from ds_inference.testing import random_prompts, reference_greedy, tiny_model


def test_1000_random_requests_with_cancellations_leak_no_block_and_keep_outputs_exact():
    rng = random.Random(0)
    model = tiny_model("llama")
    # 12 distinct prompts (some sharing prefixes) so every output can be checked against generate()
    base = random_prompts([3, 9, 17, 30, 41, 23], seed=5)
    prompts = base + [base[4][:20] + p for p in random_prompts([4, 13, 1, 8, 25, 2], seed=6)]
    expected = [reference_greedy(model, p, 8) for p in prompts]
    # 40 blocks x 4 positions: far fewer than the requests want, so requests must wait and preempt
    engine = LLMEngine(
        model,
        config={
            "block_size": 4,
            "num_blocks": 40,
            "max_num_batched_tokens": 32,
            "max_num_seqs": 16,
            "max_queue_size": 2000,
        },
    )
    kinds: dict[str, tuple[int, int]] = {}
    finished: dict[str, list[int]] = {}
    submitted = 0
    while submitted < 1000 or engine.has_unfinished():
        for _ in range(rng.randint(0, 6)):
            if submitted < 1000:
                k, n = rng.randrange(len(prompts)), rng.randint(1, 8)
                rid = engine.add_request(prompts[k], SamplingParams(max_tokens=n, ignore_eos=True))
                kinds[rid] = (k, n)
                submitted += 1
        live = list(engine._seqs)
        if live and rng.random() < 0.3:
            engine.abort(rng.choice(live))
        for out in engine.step():
            if out.finished and out.finish_reason != "abort":
                finished[out.request_id] = out.token_ids
        engine.blocks.check_invariants(list(engine._seqs.values()))
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(c == 0 for c in engine.blocks.ref_counts)
    assert len(finished) > 500
    for rid, tokens in finished.items():
        k, n = kinds[rid]
        assert tokens == expected[k][:n], rid
    assert engine.scheduler.num_preemptions > 0  # the small cache really ran out
    assert engine.blocks.prefix_hits > 0


def test_out_of_blocks_makes_requests_wait():
    model = tiny_model("gpt2")
    prompts = random_prompts([30, 30, 30])
    engine = LLMEngine(
        model,
        config={
            "block_size": 4,
            "num_blocks": 12,
            "max_num_batched_tokens": 64,
            "enable_prefix_caching": False,
        },
    )
    ids = [engine.add_request(p, SamplingParams(max_tokens=4, ignore_eos=True)) for p in prompts]
    engine.step()
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.waiting) == 2
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o.token_ids
    assert [outs[i] for i in ids] == [reference_greedy(model, p, 4) for p in prompts]


def test_prefix_cache_shares_full_blocks_and_skips_their_compute():
    model = tiny_model("qwen2")
    shared = random_prompts([33], seed=3)[0]
    a, b = shared + [5, 6], shared + [7]
    engine = LLMEngine(model, config={"block_size": 8, "num_blocks": 32})
    first = engine.generate([a], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    second = engine.generate([b], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert first.cached_tokens == 0 and second.cached_tokens == 32  # four full blocks of 8 reused
    assert second.token_ids == reference_greedy(model, b, 4)


def test_block_manager_refuses_without_partial_allocation():
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = Sequence("a", [1] * 10, SamplingParams())
    assert not bm.allocate(seq, 13) and seq.block_table == [] and bm.num_free == 3
    assert bm.allocate(seq, 12) and bm.num_free == 0
    bm.free(seq)
    assert bm.num_free == 3
    with pytest.raises(ValueError):
        BlockManager(0, 4)
