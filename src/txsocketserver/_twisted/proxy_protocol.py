# -*- test-case-name: tests.test_proxy_protocol -*-
"""The PROXY protocol (HAProxy's, versions 1 and 2): the header, and whom to believe.

A load balancer that speaks the PROXY protocol starts each connection it opens
to us with a header naming the client it is relaying: ``PROXY TCP4 <src>
<dst> <sport> <dport>\\r\\n`` in version 1, a binary block in version 2.  This
module is pure parsing and policy, with no Twisted and no I/O:

* :func:`parse_header` reads a header from the bytes received so far, however
  they were split into segments: it says "need more", "here it is" or raises
  :class:`ProxyHeaderError`;
* :class:`TrustedProxies` says whether the peer that sent a header may claim
  another address at all.

The connection side (buffering, the header deadline, logging) lives in
``proxy_stage``; choosing the endpoints that use it in ``endpoints``.

Specification: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from typing import NamedTuple

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A v1 line is at most 107 bytes, CRLF included.
V1_MAX_LENGTH = 107
# Signature, version/command, family/protocol, length.
V2_FIXED_LENGTH = 16

#: Trusted by default: the loopback addresses, where a local HAProxy or
#: stunnel connects from.  Anything farther must be listed by the operator.
DEFAULT_TRUSTED_PROXIES = ("127.0.0.1", "::1")


class ProxyHeaderError(ValueError):
    """The bytes received are not a valid PROXY protocol header."""


class ProxyHeader(NamedTuple):
    """A parsed PROXY header.

    ``local`` is a v2 ``LOCAL`` command: the proxy speaks for itself (a health
    check), no client is relayed.  ``source`` and ``destination`` are
    ``socket.accept()``-style addresses, or ``None`` when the header names
    none (``LOCAL``, v1 ``UNKNOWN``, an unsupported v2 family): the
    connection's own addresses then stand.  ``length`` is the header's size;
    what follows it is payload.
    """

    local: bool
    family: socket.AddressFamily | None
    source: tuple[str, int] | tuple[str, int, int, int] | str | None
    destination: tuple[str, int] | tuple[str, int, int, int] | str | None
    length: int


def _could_become(data: bytes | bytearray, prefix: bytes) -> bool:
    """Whether *data* is a prefix of *prefix* or starts with it."""
    size = min(len(data), len(prefix))
    return data[:size] == prefix[:size]


def parse_header(data: bytes | bytearray) -> ProxyHeader | None:
    """Parse the PROXY header at the start of *data*.

    Args:
        data: every byte received on the connection so far.

    Returns:
        The header, or ``None`` if *data* is a valid beginning of one and more
        bytes are needed.

    Error handling:
        ``ProxyHeaderError`` saying what is wrong, as soon as *data* cannot
        begin a valid header.
    """
    if _could_become(data, V2_SIGNATURE):
        return _parse_v2(bytes(data)) if len(data) >= V2_FIXED_LENGTH else None
    if _could_become(data, V1_PREFIX):
        return _parse_v1(bytes(data)) if len(data) > len(V1_PREFIX) else None
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        # A bare LF ends nothing, but only an UNKNOWN line may hold one (the
        # receiver ignores what it says): fail every other line at once.
        if len(data) >= V1_MAX_LENGTH or (
            b"\n" in data and not data.startswith(b"PROXY UNKNOWN ")
        ):
            raise ProxyHeaderError("PROXY v1 line not ended by CRLF within 107 bytes")
        return None
    fields = data[:end].split(b" ")
    length = end + 2
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return ProxyHeader(False, None, None, None, length)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"bad PROXY v1 line {data[:end]!r}")
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    try:
        hosts = [ipaddress.ip_address(field.decode("ascii")) for field in fields[2:4]]
        ports = [int(field) for field in fields[4:6]]
    except ValueError:
        raise ProxyHeaderError(f"bad PROXY v1 address in {data[:end]!r}") from None
    if (
        any(host.version != (4 if family == socket.AF_INET else 6) for host in hosts)
        or not all(field.isdigit() for field in fields[4:6])
        or not all(0 <= port <= 65535 for port in ports)
    ):
        raise ProxyHeaderError(f"bad PROXY v1 address in {data[:end]!r}")
    # Written as inet_ntop() writes it, as v2's and socket.accept()'s are
    # (str() of an IPv6Address differs for ::a.b.c.d, and before Python 3.13
    # for ::ffff:a.b.c.d).
    source, destination = (
        _ip_address(family, socket.inet_ntop(family, h.packed), p)
        for h, p in zip(hosts, ports, strict=True)
    )
    return ProxyHeader(False, family, source, destination, length)


def _ip_address(
    family: socket.AddressFamily, host: str, port: int
) -> tuple[str, int] | tuple[str, int, int, int]:
    """What ``socket.accept()`` returns for this family."""
    return (host, port) if family == socket.AF_INET else (host, port, 0, 0)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    version_command, family_protocol, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"unsupported PROXY protocol version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"unknown PROXY v2 command {command}")
    length = V2_FIXED_LENGTH + size
    if len(data) < length:
        return None
    if command == 0:
        return ProxyHeader(True, None, None, None, length)
    body = data[V2_FIXED_LENGTH:length]
    address_family, transport = family_protocol >> 4, family_protocol & 0x0F
    if transport not in (1, 2) or address_family not in (1, 2, 3):
        # UNSPEC, or a datagram header: keep the connection's own addresses.
        return ProxyHeader(False, None, None, None, length)
    if address_family == 1:
        if size < 12:
            raise ProxyHeaderError("PROXY v2 IPv4 block too short")
        source_port, destination_port = struct.unpack_from("!HH", body, 8)
        return ProxyHeader(
            False,
            socket.AF_INET,
            (socket.inet_ntop(socket.AF_INET, body[0:4]), source_port),
            (socket.inet_ntop(socket.AF_INET, body[4:8]), destination_port),
            length,
        )
    if address_family == 2:
        if size < 36:
            raise ProxyHeaderError("PROXY v2 IPv6 block too short")
        source_port, destination_port = struct.unpack_from("!HH", body, 32)
        return ProxyHeader(
            False,
            socket.AF_INET6,
            (socket.inet_ntop(socket.AF_INET6, body[0:16]), source_port, 0, 0),
            (socket.inet_ntop(socket.AF_INET6, body[16:32]), destination_port, 0, 0),
            length,
        )
    if size < 216:
        raise ProxyHeaderError("PROXY v2 Unix block too short")
    source_path, destination_path = (
        body[start : start + 108].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        for start in (0, 108)
    )
    return ProxyHeader(False, socket.AF_UNIX, source_path, destination_path, length)


class TrustedProxies:
    """The peers whose PROXY header is believed.

    Args:
        entries: IP addresses (``"10.0.0.5"``) and networks (``"10.0.0.0/8"``,
            ``"fd00::/8"``); ``"*"`` trusts every peer.  Connections over a Unix
            socket are always trusted: the socket file's permissions decide who
            may connect.  IPv4-mapped IPv6 peers (``::ffff:10.0.0.5``) match
            their IPv4 entries.

    Error handling:
        ``ValueError`` naming the entry that is neither an address nor a network.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = tuple(entries)
        self.anyone = "*" in self.entries
        networks = []
        for entry in self.entries:
            if entry == "*":
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted proxy {entry!r} is neither an IP address nor a network"
                ) from None
        self._networks = tuple(networks)

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.entries)!r})"

    def trusts(self, peer: object) -> bool:
        """Whether the connection's own peer address (as ``accept()`` gives it) is trusted."""
        if self.anyone or isinstance(peer, (str, bytes)):
            return True
        try:
            host = ipaddress.ip_address(peer[0])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            return False
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped
        return any(host in network for network in self._networks)


__all__ = [
    "DEFAULT_TRUSTED_PROXIES",
    "ProxyHeader",
    "ProxyHeaderError",
    "TrustedProxies",
    "parse_header",
]
