"""``_twisted/addresses.py``: Twisted's addresses as ``socket.accept()`` gives them."""

from __future__ import annotations

import socket

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from txsocketserver._twisted.addresses import socket_address, socket_family, underlying_socket


def test_each_family_converts_as_accept_returns_it() -> None:
    assert socket_address(IPv4Address("TCP", "10.1.2.3", 80)) == ("10.1.2.3", 80)
    assert socket_address(IPv6Address("TCP", "::1", 80, 5, 2)) == ("::1", 80, 5, 2)
    assert socket_address(UNIXAddress(b"/tmp/x.sock")) == "/tmp/x.sock"
    assert socket_address(UNIXAddress(b"\0abstract")) == b"\0abstract"
    assert socket_address(UNIXAddress(None)) == ""
    assert socket_family(IPv4Address("TCP", "10.1.2.3", 80)) == socket.AF_INET
    assert socket_family(IPv6Address("TCP", "::1", 80)) == socket.AF_INET6
    assert socket_family(UNIXAddress(b"/tmp/x.sock")) == socket.AF_UNIX


class _Handle:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def getHandle(self) -> socket.socket:
        return self._sock


def test_the_os_socket_is_found_through_protocol_wrappers() -> None:
    with socket.socket() as sock:
        transport = _Handle(sock)
        assert underlying_socket(transport) is sock
        wrapper = ProtocolWrapper(WrappingFactory(None), None)  # type: ignore[arg-type]
        wrapper.transport = transport
        assert underlying_socket(wrapper) is sock
        assert underlying_socket(object()) is None
