"""The serving engine's greedy tokens equal transformers generate(); requests join mid-flight."""

from __future__ import annotations

import pytest
import torch
from ds_inference.serving import LLMEngine, SamplingParams
from ds_inference.testing import FAMILIES, random_prompts, reference_greedy, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_serving_greedy_equals_transformers_generate_with_requests_joining_mid_flight(family):
    model = tiny_model(family)
    prompts = random_prompts([5, 37, 12, 3, 61, 20])
    new_tokens = [10, 6, 14, 9, 5, 12]
    expected = [reference_greedy(model, p, n) for p, n in zip(prompts, new_tokens, strict=True)]
    # a small block size and token budget force chunked prefill and several blocks per sequence
    engine = LLMEngine(model, config={"block_size": 4, "num_blocks": 128, "max_num_batched_tokens": 24})
    got: dict[str, list[int]] = {}
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True))
        for p, n in zip(prompts[:3], new_tokens[:3], strict=True)
    ]
    steps = 0
    while engine.has_unfinished() or len(ids) < len(prompts):
        if steps in (2, 5, 9) and len(ids) < len(prompts):  # later requests join between passes
            i = len(ids)
            ids.append(
                engine.add_request(prompts[i], SamplingParams(max_tokens=new_tokens[i], ignore_eos=True))
            )
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
        steps += 1
    assert [got[i] for i in ids] == expected
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_serving_logits_match_transformers_forward():
    model = tiny_model("llama")
    prompt = random_prompts([30])[0]
    engine = LLMEngine(model, config={"block_size": 8, "num_blocks": 16, "max_num_batched_tokens": 7})
    engine.add_request(prompt, SamplingParams(max_tokens=1))
    logits = []
    while engine.has_unfinished():
        chunks = engine.scheduler.schedule()
        out = engine.runner.run(chunks)
        for c in chunks:
            c.seq.num_computed += c.num_tokens
            if c.samples:
                logits.append(out[0])
                engine.scheduler.finish(c.seq, "length")
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0], ref, atol=1e-4, rtol=1e-4)


def test_stop_token_ids_and_max_tokens_end_requests():
    model = tiny_model("gpt2")
    prompt = random_prompts([8])[0]
    ref = reference_greedy(model, prompt, 8)
    engine = LLMEngine(model, config={"num_blocks": 32})
    out = engine.generate([prompt], SamplingParams(max_tokens=8, stop_token_ids=[ref[3]]))[0]
    assert out.token_ids == ref[: ref.index(ref[3]) + 1] and out.finish_reason == "stop"
    out = engine.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.token_ids == ref[:5] and out.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_options_change_the_distribution():
    model = tiny_model("llama")
    prompts = random_prompts([6]) * 2
    engine = LLMEngine(model, config={"num_blocks": 64})
    params = SamplingParams(max_tokens=20, temperature=1.5, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    a, b = engine.generate(prompts, [params, params])
    assert a.token_ids == b.token_ids  # same prompt, same seed, batched together
    c = engine.generate(
        [prompts[0]], SamplingParams(max_tokens=20, temperature=1.5, seed=8, ignore_eos=True)
    )[0]
    assert c.token_ids != a.token_ids
    top1 = engine.generate(
        [prompts[0]], SamplingParams(max_tokens=10, temperature=2.0, top_k=1, seed=3, ignore_eos=True)
    )[0]
    assert top1.token_ids == reference_greedy(model, prompts[0], 10)  # top_k=1 is greedy


def test_repetition_penalty_matches_transformers():
    from transformers import GenerationConfig

    model = tiny_model("qwen2")
    prompt = random_prompts([10])[0]
    gc = GenerationConfig(
        max_new_tokens=12, do_sample=False, repetition_penalty=1.8, eos_token_id=None, pad_token_id=0
    )
    ids = torch.tensor([prompt])
    ref = model.generate(ids, generation_config=gc, attention_mask=torch.ones_like(ids))[0, 10:].tolist()
    engine = LLMEngine(model, config={"num_blocks": 32})
    out = engine.generate([prompt], SamplingParams(max_tokens=12, repetition_penalty=1.8, ignore_eos=True))[0]
    assert out.token_ids == ref


def test_stop_strings_truncate_text(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    engine = LLMEngine(model, tokenizer, config={"num_blocks": 64})
    full = engine.generate(["The module"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    out = engine.generate(["The module"], SamplingParams(max_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(stop)]


def test_bad_requests_are_rejected_with_clear_errors():
    engine = LLMEngine(tiny_model("gpt2"), config={"num_blocks": 8, "block_size": 4, "max_model_len": 64})
    with pytest.raises(ValueError, match="context is 64"):
        engine.add_request(list(range(3, 67)))
    with pytest.raises(ValueError, match="more KV blocks"):
        engine.add_request([5] * 10, SamplingParams(max_tokens=40))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.add_request("text")
    with pytest.raises(ValueError, match="vocab|\\[0, 128\\)"):
        engine.add_request([500])
    with pytest.raises(Exception, match="max_num_seqz"):
        LLMEngine(tiny_model("gpt2"), config={"max_num_seqz": 3})


def _serve_tp_worker(family: str, prompts: list[list[int]], n: int, inject: bool) -> list[list[int]]:
    from ds_inference import init_inference

    engine = init_inference(
        tiny_model(family), tensor_parallel={"tp_size": 2}, replace_with_kernel_inject=inject
    )
    serving = LLMEngine(
        engine.module, config={"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 16}
    )
    return [o.token_ids for o in serving.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))]


@pytest.mark.parametrize("family,inject", [("llama", True), ("gpt2", False), ("mixtral", False)])
def test_serving_engine_on_a_tp2_model_equals_transformers_generate(family, inject):
    from ds_core.testing import run_distributed

    prompts = random_prompts([9, 21, 4])
    model = tiny_model(family)
    expected = [reference_greedy(model, p, 8) for p in prompts]
    for tokens in run_distributed(_serve_tp_worker, 2, family, prompts, 8, inject):
        assert tokens == expected


def test_serving_engine_on_a_kernel_injected_model():
    from ds_inference import init_inference

    prompts = random_prompts([13, 5])
    expected = [reference_greedy(tiny_model("qwen2"), p, 8) for p in prompts]
    engine = init_inference(tiny_model("qwen2"), replace_with_kernel_inject=True)
    serving = LLMEngine(engine.module, config={"block_size": 4, "num_blocks": 64})
    assert [
        o.token_ids for o in serving.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    ] == expected


def test_streamed_deltas_add_up_to_the_text_when_a_stop_token_ends_a_request_with_stop_strings(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer))
    engine = LLMEngine(model, tokenizer, config={"num_blocks": 64})
    ref = engine.generate(["The module"], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    stop_token = ref[5]
    expected = tokenizer.decode(ref[: ref.index(stop_token) + 1], skip_special_tokens=True)
    # a stop string that never matches makes the engine hold back text; the stop token must flush it
    params = SamplingParams(max_tokens=12, stop=["\x00never"], stop_token_ids=[stop_token], ignore_eos=True)
    rid = engine.add_request("The module", params)
    deltas, last = [], None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                deltas.append(o.text_delta)
                last = o
    assert last.finish_reason == "stop" and "".join(deltas) == expected == last.text
