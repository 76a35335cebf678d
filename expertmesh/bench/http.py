"""The load generator's HTTP/1.1 client: one connection per request, the response parsed by httptools (uvicorn's C
parser, already a dependency). httpx, which `bench serve` used before, spent 220 µs of CPU per streamed token on a
2-core CPU, more than the gateway serving it: at the GPU rows' 10-13k tok/s one client process would have been
the bound, not the cluster (benchmarks/RESULTS.md, seventh session)."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator
from urllib.parse import urlsplit

import httptools


class HTTPError(Exception):
    """The server could not be reached, or the connection ended before the response did."""


class Response:
    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._parser = httptools.HttpResponseParser(self)
        self._body: list[bytes] = []
        self._head_done = self._complete = False
        self.status = 0

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self._head_done = True
        self.status = self._parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        self._complete = True

    async def _feed(self) -> bool:
        """Parses what arrives next; False at the end of the connection."""
        data = await self._reader.read(1 << 16)
        if not data:
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise HTTPError(f"malformed response: {exc}") from None
        return True

    async def _read_head(self) -> None:
        while not self._head_done:
            if not await self._feed():
                raise HTTPError("the connection closed before the response's headers")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded), up to the end of the response."""
        while True:
            if self._body:
                body, self._body = b"".join(self._body), []
                yield body
            if self._complete or not await self._feed():  # a body without a length ends with the connection
                return

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


@contextlib.asynccontextmanager
async def request(url: str, method: str, path: str, body: bytes | None = None) -> AsyncIterator[Response]:
    """`url`: http://host:port. The response with its status and headers read; its body through chunks() or read()."""
    address = urlsplit(url)
    host, port = address.hostname or "127.0.0.1", address.port or 80
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise HTTPError(f"cannot connect to {host}:{port}: {exc}") from None
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    try:
        writer.write(head.encode() + b"\r\n" + (body or b""))
        response = Response(reader)
        await response._read_head()
        yield response
    except (OSError, asyncio.IncompleteReadError) as exc:
        raise HTTPError(f"{method} {path}: {exc!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def fetch(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    """A whole response: (status, body)."""
    async with request(url, method, path, body) as response:
        return response.status, await response.read()
