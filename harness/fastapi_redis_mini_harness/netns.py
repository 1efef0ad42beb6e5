"""Several hosts on one machine, and a network partition between them.

A `Network` is a switch and the hosts plugged into it, each a network namespace of its own.
The switch is a namespace holding two bridges: `whole`, where every host's port sits, and
`cut`, where `cut(hosts)` moves the ports of some hosts in one `ip -batch` run. The hosts on
either side still reach each other and nothing across; a frame sent across is dropped
without a reset or an ICMP answer, as on a failed link. `heal()` moves the ports back.

Code runs on a host through `Host.run(fn)` or `Host.submit(fn)`: fn runs in a thread that
joined the host's namespace (setns(2) moves only the calling thread), so the sockets it opens
and the processes it starts (a Redis node, the api) live on that host. Threads and processes
they start stay there too.

Every name is unique to the `Network` (the pid and a random part), and `close()` deletes
every namespace it made, so runs sharing a machine never meet and none is left behind.
Making namespaces needs root; `unavailable()` says why they cannot be made here, so a caller
can skip with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
IP_TIMEOUT = 10.0
# Threads per host: enough for a load's submitters and a probe beside them.
HOST_THREADS = 16
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")


class NetnsError(RuntimeError):
    """An `ip` command failed; the message holds the command and what it wrote."""


def _ip(*args: str, stdin: str | None = None) -> None:
    command = ["ip", *args]
    try:
        result = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=IP_TIMEOUT
        )
    except subprocess.TimeoutExpired as error:
        raise NetnsError(f"{' '.join(command)} took more than {IP_TIMEOUT:g} s") from error
    if result.returncode != 0:
        raise NetnsError(f"{' '.join(command)}: {result.stderr.strip() or result.stdout}")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (one is made, with
    a veth pair in it, then deleted)."""
    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"frm-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as error:
        return f"ip netns add failed: {error}"
    try:
        _ip("-n", probe, "link", "add", "name", "probe0", "type", "veth", "peer", "name", "probe1")
    except NetnsError as error:
        return f"no veth pair in a namespace: {error}"
    finally:
        with contextlib.suppress(NetnsError):
            _ip("netns", "delete", probe)
    return None


def _enter(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


class Host:
    """One network namespace with one interface (`eth0`, at `address`) to the switch."""

    def __init__(self, name: str, label: str, address: str, port: str) -> None:
        self.name = name
        self.label = label
        self.address = address
        self.port = port  # its port's name on the switch
        self._threads = ThreadPoolExecutor(
            HOST_THREADS,
            thread_name_prefix=f"host-{label}",
            initializer=_enter,
            initargs=(str(NETNS_DIR / name),),
        )

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Start fn(*args, **kwargs) on this host; at most HOST_THREADS run at once."""
        return self._threads.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """fn(*args, **kwargs) on this host, its answer or its exception. fn bounds its own
        time: a call that never returns would hold a thread of the host."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"Host({self.label!r}, {self.address})"


class Network:
    """A switch and the hosts on it; `with Network() as network:` deletes all on exit."""

    def __init__(self, subnet: ipaddress.IPv4Network = SUBNET) -> None:
        self.prefix = f"frm-{os.getpid()}-{secrets.token_hex(2)}"
        self._addresses = subnet.hosts()
        self._prefix_length = subnet.prefixlen
        self._namespaces: list[str] = []
        self.hosts: list[Host] = []
        self.switch = f"{self.prefix}-switch"
        self.isolated: frozenset[Host] = frozenset()
        self._add_namespace(self.switch)
        try:
            for bridge in ("whole", "cut"):
                _ip("-n", self.switch, "link", "add", bridge, "type", "bridge")
                _ip("-n", self.switch, "link", "set", bridge, "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def add_host(self, label: str) -> Host:
        """A new host named `label`, at the subnet's next address, plugged into `whole`."""
        name = f"{self.prefix}-{label}"
        address = str(next(self._addresses))
        port = f"p{len(self.hosts)}"
        self._add_namespace(name)
        _ip("link", "add", "name", "eth0", "netns", name, "type", "veth", "peer", "name", port,
            "netns", self.switch)  # fmt: skip
        _ip("-n", name, "address", "add", f"{address}/{self._prefix_length}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "set", port, "master", "whole", "up")
        host = Host(name, label, address, port)
        self.hosts.append(host)
        return host

    def _move(self, hosts: Collection[Host], bridge: str) -> None:
        commands = "".join(f"link set {host.port} master {bridge}\n" for host in hosts)
        _ip("-n", self.switch, "-batch", "-", stdin=commands)

    def cut(self, hosts: Collection[Host]) -> None:
        """Cut `hosts` off from every other host: they keep only each other."""
        if self.isolated:
            raise NetnsError(f"already cut: {sorted(h.label for h in self.isolated)}")
        unknown = set(hosts) - set(self.hosts)
        if unknown or not hosts:
            raise ValueError(f"not hosts of this network: {unknown or 'none given'}")
        self._move(hosts, "cut")
        self.isolated = frozenset(hosts)

    def heal(self) -> None:
        """Put every host back on one network."""
        if self.isolated:
            self._move(self.isolated, "whole")
            self.isolated = frozenset()

    def namespaces(self) -> list[str]:
        """The namespaces this network made and has not deleted."""
        return list(self._namespaces)

    def close(self) -> None:
        """Delete every namespace made here (their interfaces go with them), whatever fails.

        A process still running on a host keeps its namespace alive, nameless, until it
        exits: stop the processes first."""
        for host in self.hosts:
            host.close()
        errors = []
        for name in reversed(self._namespaces):
            try:
                _ip("netns", "delete", name)
            except NetnsError as error:
                errors.append(str(error))
        self._namespaces.clear()
        if errors:
            raise NetnsError("; ".join(errors))

    def __enter__(self) -> Network:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
