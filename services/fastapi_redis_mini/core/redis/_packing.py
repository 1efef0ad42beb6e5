"""Packing commands: the connections the service's clients use, with hiredis's C packer.

Owns the connection classes connect() gives its pools and cluster nodes. redis-py's
synchronous client packs commands with hiredis when it is installed; its asyncio client (8.1)
packs them in Python, re-joining its buffer for every argument until it passes 6 KB. The
worker's calls carry several keys per task (a finish of 500 outcomes names 1,500 keys), and
that loop cost it 3 to 6 us per task in a finish alone. hiredis builds the same bytes in C,
in about a tenth of the time or less (a finish of 36 outcomes: 220 us against 14).

An argument hiredis does not take (None, a bool, any other type) goes through redis-py's own
packer, so its error (a DataError that names the type) is what the caller sees.
"""

from __future__ import annotations

from typing import Any, cast

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.typing import EncodableT


def _pack(connection: AbstractConnection, args: tuple[EncodableT, ...]) -> list[bytes]:
    first = args[0]
    # A command named with its subcommand ("CONFIG GET") is sent as two arguments, as
    # redis-py does.
    if isinstance(first, str | bytes):
        args = (*first.split(), *args[1:])
    try:
        # (hiredis's stub types the tuple as one item long; it takes any length.)
        return [hiredis.pack_command(cast(Any, args))]
    except TypeError:
        return AbstractConnection.pack_command(connection, *args)


class PackedConnection(Connection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args)


class PackedSSLConnection(SSLConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args)


class PackedUnixConnection(UnixDomainSocketConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args)


_PACKED: dict[type[Any], type[Any]] = {
    Connection: PackedConnection,
    SSLConnection: PackedSSLConnection,
    UnixDomainSocketConnection: PackedUnixConnection,
}


def packed(connection_class: type[Any]) -> type[Any]:
    """The class to use instead of `connection_class`; itself when there is none."""
    return _PACKED.get(connection_class, connection_class)
