"""Runs an LLMEngine on a background thread and streams its outputs to asyncio consumers.

The engine is not thread-safe, so every mutation (add, abort) is a command executed by the
engine thread between forward passes; results come back through futures and asyncio queues
(``loop.call_soon_threadsafe``). The thread sleeps when there is no work.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any

from ds_core.logging import logger

from .llm_engine import LLMEngine, QueueFullError, RequestOutput
from .sampling import SamplingParams

__all__ = ["AsyncLLMEngine", "RequestStream"]


@dataclass
class RequestStream:
    request_id: str
    prompt_tokens: int
    outputs: asyncio.Queue  # RequestOutput items; the last one has finished=True


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_queue_size: int | None = None) -> None:
        self.engine = engine
        self.max_queue_size = max_queue_size or engine.config.max_queue_size
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds-serve-engine", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    # --- API for the event loop -------------------------------------------------------------
    async def submit(self, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Queue a request; raises QueueFullError past the limit, ValueError for a bad request."""
        with self._lock:
            if self._in_flight >= self.max_queue_size:
                raise QueueFullError(f"{self._in_flight} requests in flight (limit {self.max_queue_size})")
            self._in_flight += 1
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        out_queue: asyncio.Queue = asyncio.Queue()
        request_id = f"cmpl-{next(self._ids)}"
        self._commands.put(("add", (request_id, prompt, params, loop, out_queue), done))
        try:
            prompt_tokens = await done
        except BaseException:
            with self._lock:
                self._in_flight -= 1
            raise
        return RequestStream(request_id, prompt_tokens, out_queue)

    def abort(self, request_id: str) -> None:
        """Cancel (e.g. the client went away); safe from any thread, a no-op if already finished."""
        self._commands.put(("abort", request_id, None))

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None, None))
        self._thread.join(timeout=10)

    # --- engine thread ----------------------------------------------------------------------
    def _resolve(
        self,
        fut: asyncio.Future | None,
        loop: asyncio.AbstractEventLoop,
        value: Any,
        error: BaseException | None = None,
    ) -> None:
        def settle() -> None:
            if fut.cancelled():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        loop.call_soon_threadsafe(settle)

    def _execute(self, kind: str, payload: Any, fut: asyncio.Future | None) -> None:
        if kind == "add":
            request_id, prompt, params, loop, out_queue = payload
            try:
                self.engine.add_request(prompt, params, request_id=request_id)
            except (ValueError, QueueFullError) as exc:
                self._resolve(fut, loop, None, exc)
                return
            self._streams[request_id] = (loop, out_queue)
            self._resolve(fut, loop, len(self.engine._seqs[request_id].token_ids))
        elif kind == "abort":
            self.engine.abort(payload)

    def _deliver(self, out: RequestOutput) -> None:
        target = self._streams.get(out.request_id)
        if target is None:
            return
        loop, out_queue = target
        if out.finished:
            del self._streams[out.request_id]
            with self._lock:
                self._in_flight -= 1
        loop.call_soon_threadsafe(out_queue.put_nowait, out)

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                while True:
                    self._execute(*cmd)
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                pass
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed pass must not leave clients hanging
                logger.exception("serving engine step failed")
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    loop, out_queue = self._streams.pop(rid)
                    with self._lock:
                        self._in_flight -= 1
                    loop.call_soon_threadsafe(out_queue.put_nowait, exc)
                continue
            for out in outputs:
                self._deliver(out)
