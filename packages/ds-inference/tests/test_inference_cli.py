"""``ds-serve`` as a real process: starts, answers over HTTP, rejects a bad model directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from ds_core.comm import free_port
from ds_inference.testing import tiny_model


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ds_inference.server.cli", *args]


def test_ds_serve_process_serves_completions(tmp_path, tokenizer):
    model = tiny_model("qwen2", vocab=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _serve_cmd(
            str(tmp_path),
            "--port",
            str(port),
            "--model-name",
            "tiny-qwen",
            "--num-blocks",
            "64",
            "--max-model-len",
            "128",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        line = ""
        deadline = time.time() + 120
        while time.time() < deadline and "serving" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"ds-serve exited with {proc.returncode}")
        assert f"http://127.0.0.1:{port}" in line
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-qwen"
            r = c.post(
                "/v1/completions",
                json={"model": "tiny-qwen", "prompt": "Hello", "max_tokens": 5, "ignore_eos": True},
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
            r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 200})
            assert r.status_code == 400 and "maximum context length of 128" in r.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ds_serve_rejects_a_missing_model_directory(tmp_path):
    r = subprocess.run(
        _serve_cmd(str(tmp_path / "nope"), "--port", "1"), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
