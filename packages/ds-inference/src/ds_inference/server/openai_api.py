"""OpenAI-compatible routes over the async serving engine.

``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat template), ``/v1/models``,
``/health``; ``"stream": true`` answers with server-sent events. A client that disconnects has
its request cancelled (its KV blocks freed at the next engine pass).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from ds_core.logging import logger

from ..serving import QueueFullError, SamplingParams
from ..serving.async_engine import AsyncLLMEngine, RequestStream
from .http import HTTPError, Request, SSEWriter

__all__ = ["OpenAIApp"]

# OpenAI fields we accept and ignore only when they carry their no-op default
_NOOP_DEFAULTS = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": None,
    "echo": False,
    "best_of": 1,
    "logit_bias": None,
    "suffix": None,
    "top_logprobs": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
}
_SAMPLING_KEYS = {
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "ignore_eos",
    "stop_token_ids",
}


class OpenAIApp:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, default_max_tokens: int = 256) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.max_model_len
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    # --- routing ----------------------------------------------------------------------------
    async def __call__(self, req: Request) -> tuple[int, Any] | None:
        routes = {
            "/health": ("GET", self.health),
            "/v1/models": ("GET", self.models),
            "/v1/completions": ("POST", self.completions),
            "/v1/chat/completions": ("POST", self.chat_completions),
        }
        if req.path not in routes:
            raise HTTPError(
                404,
                f"no route {req.path}; see /v1/models, /v1/completions, /v1/chat/completions",
                code="not_found",
            )
        method, fn = routes[req.path]
        if req.method != method:
            raise HTTPError(405, f"{req.path} accepts {method}, not {req.method}")
        try:
            return await fn(req)
        except (HTTPError, ConnectionError):
            raise
        except Exception as exc:  # an internal failure still answers (unless a stream already started)
            logger.exception("request failed")
            raise HTTPError(500, f"internal error: {exc}", err_type="server_error") from None

    async def health(self, req: Request) -> tuple[int, Any]:
        return 200, {"status": "ok", "model": self.model_name, "in_flight": self.engine.num_in_flight}

    async def models(self, req: Request) -> tuple[int, Any]:
        return 200, {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "ds-inference",
                    "max_model_len": self.max_model_len,
                }
            ],
        }

    # --- request parsing ---------------------------------------------------------------------
    def _body(self, req: Request, required: str) -> dict:
        body = req.json()
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise HTTPError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
        allowed = (
            {"model", "stream", "stream_options", "user", required} | _SAMPLING_KEYS | set(_NOOP_DEFAULTS)
        )
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; accepted: {sorted(allowed)}", param=unknown[0])
        if required not in body:
            raise HTTPError(400, f"missing required field {required!r}", param=required)
        for key, default in _NOOP_DEFAULTS.items():
            if key in body and body[key] != default:
                raise HTTPError(400, f"{key}={body[key]!r} is not supported (only {default!r})", param=key)
        return body

    def _sampling(self, body: dict, prompt_len: int) -> SamplingParams:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise HTTPError(
                400,
                f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens",
                param="prompt",
                code="context_length_exceeded",
            )
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, room)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise HTTPError(
                400, f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens"
            )
        if max_tokens > room:
            raise HTTPError(
                400,
                f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds this model's "
                f"maximum context length of {self.max_model_len} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        kw: dict[str, Any] = {"max_tokens": max_tokens}
        for key in (
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "seed",
            "ignore_eos",
            "stop_token_ids",
        ):
            if body.get(key) is not None:
                kw[key] = body[key]
        stop = body.get("stop")
        if stop is not None:
            kw["stop"] = [stop] if isinstance(stop, str) else stop
        kw.setdefault("temperature", 1.0)  # OpenAI's default
        try:
            for key in ("temperature", "top_p", "repetition_penalty"):
                if key in kw and (isinstance(kw[key], bool) or not isinstance(kw[key], (int, float))):
                    raise ValueError(f"{key} must be a number")
            return SamplingParams(**kw)
        except (TypeError, ValueError) as exc:
            raise HTTPError(400, f"bad sampling options: {exc}") from None

    def _encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise HTTPError(400, "the prompt is empty", param="prompt")
            return list(self.tokenizer(prompt)["input_ids"])
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return prompt
        raise HTTPError(400, "prompt must be a non-empty string or a list of token ids", param="prompt")

    def _chat_prompt(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise HTTPError(400, "messages must be a non-empty list", param="messages")
        for i, m in enumerate(messages):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise HTTPError(
                    400, f"messages[{i}] needs a string 'role' and a string 'content'", param="messages"
                )
        if not getattr(self.tokenizer, "chat_template", None):
            raise HTTPError(400, "this model's tokenizer has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _submit(self, ids: list[int], params: SamplingParams) -> RequestStream:
        try:
            return await self.engine.submit(ids, params)
        except QueueFullError as exc:
            raise HTTPError(429, f"server busy: {exc}; retry later", err_type="rate_limit_error") from None
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None

    # --- endpoints --------------------------------------------------------------------------
    async def completions(self, req: Request) -> tuple[int, Any] | None:
        body = self._body(req, "prompt")
        ids = self._encode(body["prompt"])
        params = self._sampling(body, len(ids))
        return await self._run(req, body, ids, params, chat=False)

    async def chat_completions(self, req: Request) -> tuple[int, Any] | None:
        body = self._body(req, "messages")
        ids = self._chat_prompt(body["messages"])
        params = self._sampling(body, len(ids))
        return await self._run(req, body, ids, params, chat=True)

    async def _run(
        self, req: Request, body: dict, ids: list[int], params: SamplingParams, chat: bool
    ) -> tuple[int, Any] | None:
        stream_flag = body.get("stream", False)
        if not isinstance(stream_flag, bool):
            raise HTTPError(400, "stream must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise HTTPError(400, "stream_options supports only include_usage", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
        stream = await self._submit(ids, params)
        watcher = asyncio.ensure_future(req.wait_disconnected())
        try:
            if stream_flag:
                await self._stream(req, stream, chat, watcher, include_usage)
                return None
            return 200, await self._collect(stream, chat, watcher)
        finally:
            watcher.cancel()

    async def _next(self, stream: RequestStream, watcher: asyncio.Future):
        """The next output, or None if the client disconnected first (the request is then cancelled)."""
        getter = asyncio.ensure_future(stream.outputs.get())
        done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            self.engine.abort(stream.request_id)
            return None
        out = getter.result()
        if isinstance(out, Exception):
            raise out
        return out

    def _envelope(self, stream: RequestStream, chat: bool) -> dict:
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }

    async def _collect(self, stream: RequestStream, chat: bool, watcher: asyncio.Future) -> dict:
        text, out = "", None
        while True:
            out = await self._next(stream, watcher)
            if out is None:
                raise ConnectionResetError("client disconnected")
            text += out.text_delta
            if out.finished:
                break
        choice: dict[str, Any] = {"index": 0, "finish_reason": out.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        n = len(out.token_ids)
        return {
            **self._envelope(stream, chat),
            "choices": [choice],
            "usage": {
                "prompt_tokens": stream.prompt_tokens,
                "completion_tokens": n,
                "total_tokens": stream.prompt_tokens + n,
                "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
            },
        }

    async def _stream(
        self,
        req: Request,
        stream: RequestStream,
        chat: bool,
        watcher: asyncio.Future,
        include_usage: bool = False,
    ) -> None:
        sse = SSEWriter(req.writer)
        env = self._envelope(stream, chat)
        if chat:
            env["object"] = "chat.completion.chunk"
        try:
            await sse.start()
            if chat:
                await sse.send(
                    {**env, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
                )
            while True:
                out = await self._next(stream, watcher)
                if out is None:
                    return
                if out.text_delta or out.finished:
                    part = {"content": out.text_delta} if chat else {"text": out.text_delta}
                    choice = {"index": 0, "finish_reason": out.finish_reason if out.finished else None}
                    choice.update({"delta": part} if chat else part)
                    await sse.send({**env, "choices": [choice]})
                if out.finished:
                    break
            if include_usage:
                n = len(out.token_ids)
                usage = {
                    "prompt_tokens": stream.prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": stream.prompt_tokens + n,
                }
                await sse.send({**env, "choices": [], "usage": usage})
            await sse.send("[DONE]")
        except ConnectionError:
            self.engine.abort(stream.request_id)
