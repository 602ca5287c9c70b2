"""A small HTTP/1.1 server on asyncio streams: JSON responses, server-sent events, disconnect detection.

Only what an OpenAI-style API needs: one request per connection (``Connection: close``),
Content-Length bodies (no chunked uploads), bounded header and body sizes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HTTPError", "Request", "SSEWriter", "serve_http"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024


class HTTPError(Exception):
    """Answered as ``{"error": {...}}`` with this status (OpenAI's error shape)."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.err_type, self.param, self.code = (
            status,
            message,
            err_type,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {"message": self.message, "type": self.err_type, "param": self.param, "code": self.code}
        }


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _disconnected: asyncio.Event | None = field(default=None, repr=False)

    def json(self) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, f"the request body is not valid JSON: {exc}") from None

    async def wait_disconnected(self) -> None:
        """Returns when the client closes its side (it sends nothing more after the body)."""
        if self._disconnected is None:
            self._disconnected = asyncio.Event()
            try:
                while await self.reader.read(1024):
                    pass
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            self._disconnected.set()
        await self._disconnected.wait()


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def send_json(writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode("utf-8")
    writer.write(
        _head(
            status,
            {"Content-Type": "application/json", "Content-Length": str(len(data)), "Connection": "close"},
        )
        + data
    )
    await writer.drain()


class SSEWriter:
    """Server-sent events: ``data: <json>\\n\\n`` per event, ``data: [DONE]`` at the end."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.started = False

    async def start(self) -> None:
        self.writer.write(
            _head(
                200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "close"}
            )
        )
        self.started = True
        await self.writer.drain()

    async def send(self, payload: Any) -> None:
        text = payload if isinstance(payload, str) else json.dumps(payload)
        self.writer.write(f"data: {text}\n\n".encode())
        await self.writer.drain()  # raises ConnectionError once the client is gone


Handler = Callable[[Request], Awaitable[tuple[int, Any] | None]]


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
    except asyncio.LimitOverrunError:
        raise HTTPError(431, "request headers too large") from None
    except asyncio.TimeoutError:
        raise HTTPError(408, "timed out reading the request") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HTTPError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, _ = parts
    headers = {}
    for line in lines[1:]:
        if line:
            key, sep, value = line.partition(":")
            if not sep:
                raise HTTPError(400, f"malformed header line {line[:80]!r}")
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HTTPError(400, "Content-Length is not an integer") from None
    if length < 0 or length > MAX_BODY_BYTES:
        raise HTTPError(413, f"request body of {length} bytes exceeds the {MAX_BODY_BYTES} byte limit")
    body = await reader.readexactly(length) if length else b""
    return Request(method, target.split("?", 1)[0], headers, body, reader, writer)


async def serve_http(handler: Handler, host: str, port: int) -> asyncio.base_events.Server:
    """Start serving; ``handler`` returns (status, json) or None when it answered itself (streaming)."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await _read_request(reader, writer)
                result = await handler(request)
            except HTTPError as exc:
                result = (exc.status, exc.body())
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if result is not None:
                await send_json(writer, *result)
        except ConnectionError:
            pass
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    return await asyncio.start_server(on_connection, host, port, limit=MAX_HEADER_BYTES)
