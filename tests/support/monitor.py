"""MONITOR, read as data: every command a server ran inside a block, a script's own marked."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import redis

ARGUMENT = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


def unquote(text: bytes) -> bytes:
    """Undo the quoting MONITOR applies to each argument (sdscatrepr)."""
    out, i = bytearray(), 0
    while i < len(text):
        if text[i : i + 1] == b"\\":
            code = text[i + 1 : i + 2]
            if code == b"x":
                out += bytes([int(text[i + 2 : i + 4], 16)])
                i += 4
                continue
            out += _ESCAPES.get(code, code)
            i += 2
            continue
        out += text[i : i + 1]
        i += 1
    return bytes(out)


@contextmanager
def monitored(redis_url: str) -> Iterator[list[bytes]]:
    """Collect the MONITOR lines of everything the server runs inside the block."""
    client = redis.Redis.from_url(redis_url)
    monitor = client.connection_pool.get_connection()
    client.ping()  # opens the connection that ends the block, so its handshake is not seen
    monitor.send_command("MONITOR")  # type: ignore[no-untyped-call]
    assert monitor.read_response() == b"OK"
    lines: list[bytes] = []
    try:
        yield lines
    finally:
        marker = b"end-of-monitored-block"
        client.echo(marker)
        for _ in range(1_000_000):
            line = monitor.read_response()
            assert isinstance(line, bytes)
            if b'"ECHO"' in line and marker in line:
                break
            lines.append(line)
        monitor.disconnect()  # type: ignore[no-untyped-call]
        client.connection_pool.disconnect()
        client.close()


def split_by_caller(lines: list[bytes]) -> tuple[list[list[bytes]], list[list[bytes]]]:
    """(commands clients sent, commands scripts ran): each as its unquoted arguments."""
    sent: list[list[bytes]] = []
    scripted: list[list[bytes]] = []
    for line in lines:
        args = [unquote(a) for a in ARGUMENT.findall(line)]
        if args:
            (scripted if b" lua]" in line else sent).append(args)
    return sent, scripted
