"""The OpenAI-compatible server, driven by a real HTTP client (httpx) over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from ds_inference import pipeline
from ds_inference.server import start_server
from ds_inference.serving import SamplingParams
from ds_inference.testing import tiny_model

CONFIG = {"block_size": 8, "num_blocks": 256, "max_num_batched_tokens": 64, "max_model_len": 256}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", vocab=len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(model_dir):
    return pipeline(str(model_dir), config=CONFIG)


@pytest.fixture(scope="module")
def server(model_dir):
    # its own engine: the server's thread owns it, the tests compute expectations with `pipe`
    handle = start_server(pipeline(str(model_dir), config=CONFIG).engine, "tiny", max_queue_size=64)
    yield handle
    handle.stop()


def _greedy_text(pipe, prompt: str, n: int) -> str:
    return pipe([prompt], max_new_tokens=n, ignore_eos=True)[0].generated_text


def _sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_pipeline_tokens_equal_transformers_generate(pipe):
    import torch

    tok = pipe.tokenizer
    prompt = "The module provides"
    out = pipe(prompt, max_new_tokens=8, ignore_eos=True)[0]
    ids = torch.tensor([tok(prompt)["input_ids"]])
    ref = pipe.engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )[0, ids.shape[1] :].tolist()
    assert out.token_ids == ref and out.generated_length == 8 and out.prompt_length == ids.shape[1]


def test_health_and_models(server):
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").json()["status"] == "ok"
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "tiny"


def test_completion_and_streaming_give_the_engine_text(server, pipe):
    expected = _greedy_text(pipe, "Lists are", 12)
    body = {"model": "tiny", "prompt": "Lists are", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["choices"][0]["text"] == expected
        assert data["usage"]["completion_tokens"] == 12 and data["choices"][0]["finish_reason"] == "length"
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/completions", json=stream_body) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(s)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 12
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == expected
    assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_chat_completion_uses_the_chat_template(server, pipe):
    messages = [{"role": "user", "content": "What is a tuple?"}]
    tok = pipe.tokenizer
    prompt_ids = tok(
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    expected = pipe.engine.generate([prompt_ids], SamplingParams(max_tokens=10, ignore_eos=True))[0].text
    body = {"model": "tiny", "messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        data = c.post("/v1/chat/completions", json=body).json()
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"] == {"role": "assistant", "content": expected}
        assert data["usage"]["prompt_tokens"] == len(prompt_ids)
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            events = _sse_events(s)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1]) == expected


def test_20_concurrent_clients_each_get_their_own_answer(server, pipe):
    prompts = [f"Item {i} of the list" for i in range(20)]
    expected = [_greedy_text(pipe, p, 6 + i % 5) for i, p in enumerate(prompts)]

    async def one(client: httpx.AsyncClient, i: int) -> str:
        body = {"prompt": prompts[i], "max_tokens": 6 + i % 5, "temperature": 0, "ignore_eos": True}
        if i % 2:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                text = ""
                async for line in s.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
                return text
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    assert asyncio.run(main()) == expected


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "gpt-9", "prompt": "hi"}, 404, "does not exist"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 10_000}, 400, "maximum context length"),
        ({"prompt": "word " * 400, "max_tokens": 4}, 400, "maximum context length"),
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi", "n": 2}, 400, "n=2"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ([1, 2], 400, "JSON object"),
        ({"prompt": "hi", "max_tokenz": 3}, 400, "max_tokenz"),
        ({"prompt": "hi", "stream_options": {"chunk": 1}}, 400, "stream_options"),
    ],
)
def test_malformed_requests_get_clear_4xx(server, body, status, fragment):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = c.post("/v1/completions", **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_unknown_route_and_wrong_method(server):
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/v2/things").status_code == 404
        assert c.get("/v1/completions").status_code == 405


def test_queue_limit_answers_429(model_dir):
    engine = pipeline(str(model_dir), config=CONFIG).engine
    fast_step = engine.step

    def slow_step():  # keeps the two long requests in flight while the third one arrives
        time.sleep(0.05)
        return fast_step()

    engine.step = slow_step
    with (
        start_server(engine, "tiny", max_queue_size=2) as handle,
        httpx.Client(base_url=handle.url, timeout=60) as c,
    ):
        body = {"prompt": "long story", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with (
            c.stream("POST", "/v1/completions", json=body) as s1,
            c.stream("POST", "/v1/completions", json=body) as s2,
        ):
            next(s1.iter_lines()), next(s2.iter_lines())
            r = c.post("/v1/completions", json={"prompt": "one more", "max_tokens": 2})
            assert r.status_code == 429 and "busy" in r.json()["error"]["message"]


def test_client_disconnect_mid_stream_cancels_the_request(server):
    engine = server.async_engine.engine
    aborted_before = engine.stats["aborted"]
    body = {
        "prompt": "A very long answer",
        "max_tokens": 240,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            got = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
            assert got
        # the stream is closed: the engine must drop the request and free its blocks
        deadline = time.time() + 20
        while time.time() < deadline and (c.get("/health").json()["in_flight"] or engine.has_unfinished()):
            time.sleep(0.05)
        assert c.get("/health").json()["in_flight"] == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats["aborted"] == aborted_before + 1  # cancelled, not run to its 240 tokens
