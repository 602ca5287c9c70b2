"""Start and stop the HTTP server, in the foreground (CLI) or on a background thread (tests, notebooks)."""

from __future__ import annotations

import asyncio
import threading

from ..serving import LLMEngine
from ..serving.async_engine import AsyncLLMEngine
from .http import serve_http
from .openai_api import OpenAIApp

__all__ = ["ServerHandle", "start_server", "run_server"]


class ServerHandle:
    """A server running on its own thread; ``url`` is where it listens, ``stop()`` shuts it down."""

    def __init__(
        self,
        engine: LLMEngine,
        model_name: str,
        host: str,
        port: int,
        max_queue_size: int | None,
        default_max_tokens: int,
    ) -> None:
        self.async_engine = AsyncLLMEngine(engine, max_queue_size)
        self.app = OpenAIApp(self.async_engine, model_name, default_max_tokens)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(host, port), name="ds-serve-http", daemon=True
        )
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            self.async_engine.shutdown()
            raise self._error
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        self.url = f"http://{self.host}:{self.port}"

    def _run(self, host: str, port: int) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(serve_http(self.app, host, port))
        except BaseException as exc:  # e.g. the port is taken: report it to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            await self._server.wait_closed()

        if self._server is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self.async_engine.shutdown()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    engine: LLMEngine,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_queue_size: int | None = None,
    default_max_tokens: int = 256,
) -> ServerHandle:
    """Serve ``engine`` on a background thread (``port=0`` picks a free port)."""
    return ServerHandle(engine, model_name, host, port, max_queue_size, default_max_tokens)


def run_server(
    engine: LLMEngine,
    model_name: str,
    host: str,
    port: int,
    max_queue_size: int | None = None,
    default_max_tokens: int = 256,
) -> None:
    """Serve in the foreground until interrupted."""
    handle = start_server(engine, model_name, host, port, max_queue_size, default_max_tokens)
    print(f"ds-serve: serving {model_name!r} on {handle.url} ({engine.describe()})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        handle.stop()
