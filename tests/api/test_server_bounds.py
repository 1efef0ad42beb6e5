"""The HTTP server's bounds, against a real api process and real sockets (api/_server.py).

Each attack from the security review: a header flood, headers that never end, slow headers,
a slow body and a trickled chunked body are answered 431 or 408, or closed, within the
limits, and the api process's memory stays where it was.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fastapi_redis_mini_harness.processes import Process, start_api
from fastapi_redis_mini_harness.redis_server import RedisServer

pytestmark = pytest.mark.slow

HEADER_TIMEOUT, BODY_TIMEOUT = 1.5, 2.0


@pytest.fixture(scope="module")
def api(redis_server: RedisServer) -> Iterator[Process]:
    process = start_api(
        redis_server.url,
        HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        BODY_TIMEOUT=str(BODY_TIMEOUT),
        MAX_CONNECTIONS="50",
    )
    yield process
    process.stop()


Connect = Callable[[], socket.socket]


@pytest.fixture
def connect(api: Process) -> Iterator[Connect]:
    """Opens a socket to the api; every one is closed after the test."""
    opened: list[socket.socket] = []

    def open_one() -> socket.socket:
        opened.append(socket.create_connection(("127.0.0.1", api.port), timeout=10))
        return opened[-1]

    yield open_one
    for sock in opened:
        sock.close()


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes, within `timeout`."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def worker_rss_kib(api: Process) -> int:
    """The resident memory of the api's worker processes (gunicorn's children), in KiB."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if fields.get("PPid", "").strip() == str(api.pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total


def test_a_request_with_too_many_headers_is_answered_431_naming_the_limit(
    api: Process, connect: Connect
) -> None:
    headers = "".join(f"X-H{n}: v\r\n" for n in range(101))
    sock = connect()
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"MAX_HEADERS" in answer


def test_a_header_section_over_max_header_bytes_is_answered_431(
    api: Process, connect: Connect
) -> None:
    sock = connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"MAX_HEADER_BYTES" in answer


def test_an_unfinished_header_line_is_cut_off_before_it_grows(
    api: Process, connect: Connect
) -> None:
    # A single header line that never ends: the parser would hold it all.
    sock = connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
    refused_after = None
    try:
        for sent in range(1, 400):
            sock.sendall(b"a" * 16384)
            refused_after = sent
    except OSError:
        pass
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == b""
    assert refused_after is not None
    assert refused_after < 400  # closed long before 6 MB went in


def test_headers_that_never_finish_are_answered_408_after_header_timeout(
    api: Process, connect: Connect
) -> None:
    sock = connect()
    started = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(10):  # a header every 0.3 s: slow, but never silent
        time.sleep(0.3)
        try:
            sock.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break
    answer = read_all(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"HEADER_TIMEOUT" in answer
    assert HEADER_TIMEOUT - 0.1 < elapsed < HEADER_TIMEOUT + 2


def test_a_silent_connection_is_closed_after_header_timeout(api: Process, connect: Connect) -> None:
    sock = connect()
    started = time.monotonic()
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < HEADER_TIMEOUT + 2


def test_a_slow_body_is_answered_408_after_body_timeout(api: Process, connect: Connect) -> None:
    sock = connect()
    started = time.monotonic()
    sock.sendall(
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    answer = read_all(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"BODY_TIMEOUT" in answer
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 2


def test_a_trickled_chunked_body_is_cut_off_after_body_timeout(
    api: Process, connect: Connect
) -> None:
    sock = connect()
    started = time.monotonic()
    sock.sendall(
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for _ in range(40):  # one byte every 0.2 s, for up to 8 s
        time.sleep(0.2)
        try:
            sock.sendall(b"1\r\n \r\n")
        except OSError:
            break
    answer = read_all(sock)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert elapsed < BODY_TIMEOUT + 2.5


def test_connections_past_max_connections_are_closed_at_once(
    api: Process, connect: Connect
) -> None:
    held = [connect() for _ in range(50)]
    try:
        time.sleep(0.2)
        extra = connect()
        assert read_all(extra, timeout=3) == b""  # closed, no answer
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{api.base_url}/healthz", timeout=5).status_code == 200


def test_an_ordinary_request_still_passes_on_a_kept_alive_connection(api: Process) -> None:
    with httpx.Client(base_url=api.base_url, timeout=5) as client:
        first = client.get("/healthz", headers={f"X-H{n}": "v" for n in range(90)})
        time.sleep(HEADER_TIMEOUT + 0.3)  # idle between requests is not a slow header
        second = client.post("/tasks", json={"prompt": "p" * 8000})
    assert first.status_code == 200
    assert second.status_code == 202


def test_header_floods_leave_the_api_memory_flat(api: Process, connect: Connect) -> None:
    before = worker_rss_kib(api)
    socks = []
    for _ in range(20):  # as in the review: 20 connections each pushing unfinished headers
        sock = connect()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        try:
            for _ in range(320):  # 5 MB each if nothing stopped it
                sock.sendall(b"X-Flood: " + b"a" * 16000 + b"\r\n")
        except OSError:
            pass
        socks.append(sock)
    after = worker_rss_kib(api)
    for sock in socks:
        sock.close()
    assert before > 0
    assert after - before < 10 * 1024, (before, after)  # under 10 MiB, not the review's 50 MB
    print(f"header flood: api workers {before / 1024:.1f} -> {after / 1024:.1f} MiB")  # with -s


def test_a_client_that_leaves_mid_body_is_no_500_and_no_error(
    api: Process, connect: Connect
) -> None:
    sock = connect()
    sock.sendall(
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    time.sleep(0.3)
    sock.close()
    time.sleep(0.5)
    metrics = httpx.get(api.metrics_url, timeout=5).text
    assert 'route="/tasks",status="499"' in metrics
    errors = [
        line
        for line in metrics.splitlines()
        if 'route="/tasks",status="500"' in line
        and line.startswith("fastapi_redis_mini_http_requests_total")
    ]
    assert errors
    assert all(line.endswith(" 0.0") for line in errors), errors
    assert "ERROR" not in api.log
    assert "Traceback" not in api.log
