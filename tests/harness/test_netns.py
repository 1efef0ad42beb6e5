"""Hosts in network namespaces: what they reach, what a cut drops, and what close() removes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from functools import partial

import pytest
import redis

from fastapi_redis_mini_harness import netns
from fastapi_redis_mini_harness.netns import Host, Network
from fastapi_redis_mini_harness.polling import poll
from fastapi_redis_mini_harness.redis_server import RedisServer

pytestmark = pytest.mark.netns

LISTEN_PORT = 7000
CONNECT_TIMEOUT = 1.0
HEAL_WITHIN = 5.0


@pytest.fixture
def network() -> Iterator[Network]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    with Network() as net:
        yield net


def _listen(address: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, LISTEN_PORT))
    sock.listen()
    return sock


def _connects(address: str) -> str:
    """ "connected", "refused" or "timed out": what a TCP connect to the listener meets."""
    try:
        with socket.create_connection((address, LISTEN_PORT), timeout=CONNECT_TIMEOUT):
            return "connected"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timed out"


def _ns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}


def test_a_host_has_its_own_address_and_its_own_loopback(network: Network) -> None:
    a = network.add_host("a")
    b = network.add_host("b")
    shown = a.run(subprocess.run, ["ip", "-o", "-4", "addr", "show", "eth0"],
                  capture_output=True, text=True, check=True)  # fmt: skip
    assert f"inet {a.address}/24" in shown.stdout
    listener = a.run(_listen, "127.0.0.1")
    try:
        # The same loopback port on another host, and on this machine, is somewhere else.
        assert a.run(_connects, "127.0.0.1") == "connected"
        assert b.run(_connects, "127.0.0.1") == "refused"
        assert _connects("127.0.0.1") != "connected"
    finally:
        listener.close()


def test_a_redis_node_started_on_a_host_is_reached_from_the_other_hosts(
    network: Network,
) -> None:
    a = network.add_host("a")
    b = network.add_host("b")
    server = RedisServer(port=LISTEN_PORT, host=a.address)
    try:
        a.run(server.start)

        def ping() -> bool:
            with redis.Redis(host=a.address, port=LISTEN_PORT, socket_timeout=2) as client:
                return bool(client.ping())

        assert b.run(ping)
    finally:
        server.close()


def test_a_cut_keeps_each_side_whole_and_silently_drops_what_crosses_it(
    network: Network,
) -> None:
    a, b, c = (network.add_host(label) for label in "abc")
    listeners = [host.run(_listen, host.address) for host in (a, b, c)]
    try:

        def reaches(source: Host, target: Host) -> str:
            return source.run(_connects, target.address)

        assert [reaches(a, c), reaches(c, a), reaches(a, b)] == ["connected"] * 3
        network.cut([a, b])
        assert network.isolated == {a, b}
        # No reset, no ICMP: the connect waits out its timeout, as across a failed link.
        assert reaches(a, b) == "connected"
        assert reaches(a, c) == "timed out"
        assert reaches(c, b) == "timed out"
        network.heal()
        # Addresses the cut left unresolved (ARP) are asked again; on a busy machine the
        # first SYN after that can miss a 1 s connect.
        for source, target in ((a, c), (c, b)):
            poll(
                partial(lambda s, t: reaches(s, t) == "connected", source, target),
                HEAL_WITHIN,
                0,
                f"{source} reaching {target} after the heal",
            )
    finally:
        for listener in listeners:
            listener.close()


def test_a_second_cut_before_healing_is_refused(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    network.cut([a])
    with pytest.raises(netns.NetnsError, match="already cut"):
        network.cut([b])


def test_close_deletes_every_namespace_it_made_even_when_the_test_failed() -> None:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(f"no network namespaces here: {reason}")
    made: list[str] = []

    def failing_test() -> None:
        with Network() as net:
            net.add_host("a")
            net.add_host("b")
            made.extend(net.namespaces())
            assert set(made) <= _ns_names()
            raise RuntimeError("the test failed")

    with pytest.raises(RuntimeError, match="the test failed"):
        failing_test()
    assert len(made) == 3  # the switch and two hosts
    assert not set(made) & _ns_names()


def test_without_root_the_reason_is_given_instead_of_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    if shutil.which("ip") is None:
        assert netns.unavailable() == "no ip command (iproute2)"
    else:
        assert netns.unavailable() == "making network namespaces needs root"
