"""A minimal HTTP/1.1 keep-alive client for the end-to-end run.

A general client (httpx) spends more CPU per request than the api does, and on two cores
that would be measured as the api's time. This one only writes a request and reads one
Content-Length response, on a fixed number of connections, all on the loopback interface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

MAX_RECONNECTS = 5


class HttpError(RuntimeError):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def _connection_loop(
    host: str, port: int, requests: list[bytes], next_index: list[int], results: list[Any]
) -> None:
    reconnects = 0
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while next_index[0] < len(requests):
            index = next_index[0]
            next_index[0] += 1
            try:
                writer.write(requests[index])
                status, body, close = await _read_response(reader)
            except (asyncio.IncompleteReadError, ConnectionError) as error:
                reconnects += 1
                if reconnects > MAX_RECONNECTS:
                    raise HttpError(f"connection kept failing: {error}") from error
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                status, body, close = await _resend(reader, writer, requests[index])
            results[index] = (status, body)
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


async def _resend(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    writer.write(request)
    return await _read_response(reader)


def post_request(host: str, port: int, path: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def send_all(
    host: str, port: int, requests: Sequence[bytes], connections: int
) -> list[tuple[int, bytes]]:
    """Send every request once over `connections` keep-alive connections; answers in order."""
    pending = list(requests)
    results: list[Any] = [None] * len(pending)
    next_index = [0]
    await asyncio.gather(
        *(
            _connection_loop(host, port, pending, next_index, results)
            for _ in range(min(connections, len(pending)))
        )
    )
    return results
