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
import types
from collections.abc import Iterable, Mapping
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


# PROXY v2 TLV types (the specification's section 2.2).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# The vendors' types, each holding a one-byte subtype then the value.
PP2_TYPE_AWS = 0xEA
PP2_SUBTYPE_AWS_VPCE_ID = 0x01
PP2_TYPE_AZURE = 0xEE
PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID = 0x01
PP2_TYPE_GCP = 0xE0

# The SSL TLV's client field, and its verify field's meaning.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

#: Most TLVs one header may carry; a header with more is refused.
MAX_TLVS = 64


class ProxySSL(NamedTuple):
    """The SSL TLV (``PP2_TYPE_SSL``): what the proxy knows of the client's TLS.

    ``client_ssl``: the client connected over TLS; ``client_cert_connection``
    / ``client_cert_session``: it presented a certificate on this connection
    / in the TLS session; ``verified``: that certificate was verified (the
    TLV's ``verify`` field is 0); ``version``, ``cn`` (the certificate's
    common name), ``cipher``, ``sig_alg``, ``key_alg``: the sub-TLVs, ``None``
    when absent; ``other``: any other sub-TLV, raw bytes by type.
    """

    client_ssl: bool
    client_cert_connection: bool
    client_cert_session: bool
    verified: bool
    version: str | None = None
    cn: str | None = None
    cipher: str | None = None
    sig_alg: str | None = None
    key_alg: str | None = None
    other: Mapping[int, tuple[bytes, ...]] = types.MappingProxyType({})


class ProxyTLVs(NamedTuple):
    """A PROXY v2 header's TLVs, read-only.

    The well-known ones decoded: ``alpn`` (bytes, as on the wire),
    ``authority`` (the SNI the client sent), ``unique_id`` (bytes),
    ``ssl`` (:class:`ProxySSL`), ``aws_vpce_id`` (the AWS VPC endpoint ID),
    ``azure_link_id`` (the Azure private endpoint link ID, an int),
    ``gcp_psc_id`` (the GCP Private Service Connect ID, an int), ``netns``;
    each ``None`` when absent.  ``raw`` has every TLV (these too) as bytes
    by type, in the order received: ``raw[0xE5]`` is a tuple of values.
    """

    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    ssl: ProxySSL | None = None
    aws_vpce_id: str | None = None
    azure_link_id: int | None = None
    gcp_psc_id: int | None = None
    netns: str | None = None
    raw: Mapping[int, tuple[bytes, ...]] = types.MappingProxyType({})


#: A header without TLVs.
NO_TLVS = ProxyTLVs()


class ProxyHeader(NamedTuple):
    """A parsed PROXY header.

    ``local`` is a v2 ``LOCAL`` command: the proxy speaks for itself (a health
    check), no client is relayed.  ``source`` and ``destination`` are
    ``socket.accept()``-style addresses, or ``None`` when the header names
    none (``LOCAL``, v1 ``UNKNOWN``, an unsupported v2 family): the
    connection's own addresses then stand.  ``length`` is the header's size;
    what follows it is payload.  ``tlvs``: a v2 header's TLVs
    (:class:`ProxyTLVs`; empty for v1).  A handler reads the header its
    connection began with as ``self.request.proxy_header``.
    """

    local: bool
    family: socket.AddressFamily | None
    source: tuple[str, int] | tuple[str, int, int, int] | str | None
    destination: tuple[str, int] | tuple[str, int, int, int] | str | None
    length: int
    tlvs: ProxyTLVs = NO_TLVS


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
    body = data[V2_FIXED_LENGTH:length]
    address_family, transport = family_protocol >> 4, family_protocol & 0x0F
    # The address block's size by family; TLVs follow it.
    block = {1: 12, 2: 36, 3: 216}.get(address_family, 0)
    if command == 0:
        # LOCAL: the addresses (if any) are the proxy's own; its TLVs count.
        return ProxyHeader(
            True, None, None, None, length, parse_tlvs(body[block:]) if block <= size else NO_TLVS
        )
    if transport not in (1, 2) or address_family not in (1, 2, 3):
        # UNSPEC, or a datagram header: keep the connection's own addresses.
        return ProxyHeader(False, None, None, None, length, parse_tlvs(body[block:]))
    if size < block:
        name = {1: "IPv4", 2: "IPv6", 3: "Unix"}[address_family]
        raise ProxyHeaderError(f"PROXY v2 {name} block too short")
    tlvs = parse_tlvs(body[block:])
    if PP2_TYPE_CRC32C in tlvs.raw:
        _check_crc32c(data[:length], V2_FIXED_LENGTH + block)
    if address_family == 1:
        source_port, destination_port = struct.unpack_from("!HH", body, 8)
        return ProxyHeader(
            False,
            socket.AF_INET,
            (socket.inet_ntop(socket.AF_INET, body[0:4]), source_port),
            (socket.inet_ntop(socket.AF_INET, body[4:8]), destination_port),
            length,
            tlvs,
        )
    if address_family == 2:
        source_port, destination_port = struct.unpack_from("!HH", body, 32)
        return ProxyHeader(
            False,
            socket.AF_INET6,
            (socket.inet_ntop(socket.AF_INET6, body[0:16]), source_port, 0, 0),
            (socket.inet_ntop(socket.AF_INET6, body[16:32]), destination_port, 0, 0),
            length,
            tlvs,
        )
    source_path, destination_path = (
        body[start : start + 108].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        for start in (0, 108)
    )
    return ProxyHeader(False, socket.AF_UNIX, source_path, destination_path, length, tlvs)


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), as the PROXY v2 checksum TLV holds it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _check_crc32c(header: bytes, tlv_start: int) -> None:
    """Verify the checksum TLV of *header* (the whole header), as the
    specification requires of a receiver: computed with its value zeroed."""
    zeroed = bytearray(header)
    offset = tlv_start
    while offset + 3 <= len(zeroed):
        kind, size = zeroed[offset], int.from_bytes(zeroed[offset + 1 : offset + 3], "big")
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise ProxyHeaderError("PROXY v2 CRC32c TLV is not 4 bytes")
            expected = int.from_bytes(zeroed[offset + 3 : offset + 7], "big")
            zeroed[offset + 3 : offset + 7] = bytes(4)
            if crc32c(bytes(zeroed)) != expected:
                raise ProxyHeaderError("PROXY v2 header fails its CRC32c checksum")
            return
        offset += 3 + size


def _split_tlvs(data: bytes, what: str) -> list[tuple[int, bytes]]:
    """*data* as (type, value) pairs; every length is checked against what is left."""
    pairs = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError(f"PROXY v2 {what} truncated: {len(data) - offset} stray bytes")
        kind, size = data[offset], int.from_bytes(data[offset + 1 : offset + 3], "big")
        offset += 3
        if size > len(data) - offset:
            raise ProxyHeaderError(
                f"PROXY v2 {what} type 0x{kind:02x} claims {size} bytes, "
                f"{len(data) - offset} remain"
            )
        pairs.append((kind, data[offset : offset + size]))
        offset += size
        if len(pairs) > MAX_TLVS:
            raise ProxyHeaderError(f"PROXY v2 header has more than {MAX_TLVS} {what}s")
    return pairs


def _by_type(pairs: list[tuple[int, bytes]]) -> Mapping[int, tuple[bytes, ...]]:
    grouped: dict[int, tuple[bytes, ...]] = {}
    for kind, value in pairs:
        grouped[kind] = (*grouped.get(kind, ()), value)
    return types.MappingProxyType(grouped)


def _text(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyHeaderError(f"PROXY v2 {what} is not UTF-8: {value[:64]!r}") from None


_SSL_TEXT = {
    PP2_SUBTYPE_SSL_VERSION: "version",
    PP2_SUBTYPE_SSL_CN: "cn",
    PP2_SUBTYPE_SSL_CIPHER: "cipher",
    PP2_SUBTYPE_SSL_SIG_ALG: "sig_alg",
    PP2_SUBTYPE_SSL_KEY_ALG: "key_alg",
}


def _parse_ssl(value: bytes) -> ProxySSL:
    if len(value) < 5:
        raise ProxyHeaderError(f"PROXY v2 SSL TLV too short ({len(value)} bytes, at least 5)")
    client = value[0]
    verify = int.from_bytes(value[1:5], "big")
    pairs = _split_tlvs(value[5:], "SSL sub-TLV")
    fields: dict[str, str] = {}
    other = []
    for kind, sub in pairs:
        name = _SSL_TEXT.get(kind)
        if name is None:
            other.append((kind, sub))
        else:
            fields[name] = _text(sub, f"SSL sub-TLV {name}")
    return ProxySSL(
        client_ssl=bool(client & PP2_CLIENT_SSL),
        client_cert_connection=bool(client & PP2_CLIENT_CERT_CONN),
        client_cert_session=bool(client & PP2_CLIENT_CERT_SESS),
        verified=verify == 0,
        other=_by_type(other),
        **fields,
    )


def _vendor(value: bytes, subtype: int) -> bytes | None:
    """The value of a vendor TLV whose first byte is *subtype*."""
    return value[1:] if value[:1] == bytes([subtype]) else None


def parse_tlvs(data: bytes) -> ProxyTLVs:
    """The TLVs of a PROXY v2 header (the bytes after its address block).

    Error handling:
        ``ProxyHeaderError`` for a TLV (or an SSL sub-TLV) whose length runs
        past its container, stray bytes, more than :data:`MAX_TLVS`, or a
        text TLV that is not UTF-8.
    """
    if not data:
        return NO_TLVS
    pairs = _split_tlvs(data, "TLV")
    fields: dict[str, object] = {}
    for kind, value in pairs:
        if kind == PP2_TYPE_ALPN:
            fields["alpn"] = value
        elif kind == PP2_TYPE_AUTHORITY:
            fields["authority"] = _text(value, "authority TLV")
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > 128:
                raise ProxyHeaderError(f"PROXY v2 unique ID of {len(value)} bytes (at most 128)")
            fields["unique_id"] = value
        elif kind == PP2_TYPE_SSL:
            fields["ssl"] = _parse_ssl(value)
        elif kind == PP2_TYPE_NETNS:
            fields["netns"] = _text(value, "netns TLV")
        elif kind == PP2_TYPE_AWS:
            vpce = _vendor(value, PP2_SUBTYPE_AWS_VPCE_ID)
            if vpce is not None:
                fields["aws_vpce_id"] = _text(vpce, "AWS VPC endpoint ID")
        elif kind == PP2_TYPE_AZURE:
            link = _vendor(value, PP2_SUBTYPE_AZURE_PRIVATEENDPOINT_LINKID)
            if link is not None:
                if len(link) != 4:
                    raise ProxyHeaderError("PROXY v2 Azure link ID is not 4 bytes")
                fields["azure_link_id"] = int.from_bytes(link, "little")
        elif kind == PP2_TYPE_GCP:
            if len(value) != 8:
                raise ProxyHeaderError("PROXY v2 GCP PSC connection ID is not 8 bytes")
            fields["gcp_psc_id"] = int.from_bytes(value, "big")
    return ProxyTLVs(raw=_by_type(pairs), **fields)  # type: ignore[arg-type]


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
    "MAX_TLVS",
    "NO_TLVS",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxySSL",
    "ProxyTLVs",
    "TrustedProxies",
    "parse_header",
    "parse_tlvs",
]
