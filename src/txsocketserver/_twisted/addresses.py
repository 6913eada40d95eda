# -*- test-case-name: tests.test_addresses -*-
"""Twisted's addresses and transports as the ``socket`` module has them.

What both kinds of connection protocol need (the blocking handlers'
``transport_socket`` and the async handlers' ``_async.protocol``): the address
``socket.accept()`` would have returned, the family, and the OS socket under
a transport.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress
from twisted.protocols.policies import ProtocolWrapper

#: What ``socket.accept()`` returns as the address for each family: ``(host,
#: port)`` for IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6, a path (``""``
#: for an unnamed peer) for Unix sockets.
SocketAddress = tuple[str, int] | tuple[str, int, int, int] | str | bytes


def socket_address(address: IAddress) -> SocketAddress:
    """Convert a Twisted address to what ``socket.accept()`` would return.

    Args:
        address: from ``transport.getPeer()``/``getHost()``.

    Returns:
        ``(host, port)`` for IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6,
        the path for Unix (``""`` when unnamed; ``bytes`` for an abstract
        address).  Any other address object is returned unchanged.
    """
    if isinstance(address, IPv6Address):
        # Twisted types scopeID as str | int; a connected socket's is an int.
        return (address.host, address.port, address.flowInfo, address.scopeID)  # type: ignore[return-value]
    if isinstance(address, IPv4Address):
        return (address.host, address.port)
    if isinstance(address, UNIXAddress):
        name = address.name
        if not name:
            return ""
        if isinstance(name, bytes) and not name.startswith(b"\0"):
            return os.fsdecode(name)
        return name
    return address  # type: ignore[return-value]


def socket_family(address: IAddress) -> socket.AddressFamily:
    """The socket family of a Twisted address (IPv4 unless IPv6 or Unix)."""
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    return socket.AF_INET


def underlying_socket(transport: Any) -> socket.socket | None:
    """The OS socket under ``transport``, looking through protocol wrappers.

    TLS and PROXY-protocol transports are ``ProtocolWrapper`` objects whose
    ``transport`` attribute is the TCP transport that owns the socket.
    """
    for _ in range(16):
        get_handle = getattr(transport, "getHandle", None)
        if get_handle is not None:
            try:
                handle = get_handle()
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                return handle
        if not isinstance(transport, ProtocolWrapper):
            return None
        transport = transport.transport
    return None


__all__ = ["SocketAddress", "socket_address", "socket_family", "underlying_socket"]
