"""Property tests of the PROXY header parser: parse of build is the identity.

For any client and server address of every family (IPv4, IPv6, Unix; v1
and v2), and the headers that name none (v1 ``UNKNOWN``, v2 ``LOCAL``), the
header built as HAProxy builds it parses back to those addresses, with the
header's length, whatever payload follows; and every proper prefix of it is
"need more" (``None``), never an error.  Addresses come back written as
``socket.accept()`` writes them (``inet_ntop``), however the header wrote
them (``::1:0`` and ``::0.1.0.0`` are one address).  The builders follow the
specification (https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from txsocketserver._twisted.proxy_protocol import V2_SIGNATURE, parse_header

ports = st.integers(0, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.one_of(
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    # IPv4-mapped and IPv4-compatible: the forms that are written two ways.
    st.integers(0, 2**32 - 1).map(lambda n: f"::ffff:{ipaddress.IPv4Address(n)}"),
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)
unix_paths = st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
).filter(lambda path: len(path.encode()) <= 107)
payloads = st.binary(max_size=64)


def build_v1(family: str, source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    return (
        f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()
    )


def build_v2(
    family: socket.AddressFamily | None, source: Any, destination: Any, tlvs: bytes = b""
) -> bytes:
    if family is None:  # LOCAL
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    if family == socket.AF_UNIX:
        body = source.encode().ljust(108, b"\0") + destination.encode().ljust(108, b"\0")
        kind = 0x31
    else:
        body = socket.inet_pton(family, source[0]) + socket.inet_pton(family, destination[0])
        body += struct.pack("!HH", source[1], destination[1])
        kind = 0x11 if family == socket.AF_INET else 0x21
    body += tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, kind, len(body)) + body


def accept_style(family: socket.AddressFamily, address: tuple[str, int]) -> tuple[Any, ...]:
    # As socket.accept() writes the address, whichever way it was written.
    host = socket.inet_ntop(family, socket.inet_pton(family, address[0]))
    return (host, address[1]) if family == socket.AF_INET else (host, address[1], 0, 0)


def assert_parses_back(header_bytes: bytes, payload: bytes, expected: tuple[Any, ...]) -> None:
    header = parse_header(header_bytes + payload)
    assert header is not None
    assert (header.local, header.family, header.source, header.destination) == expected
    assert header.length == len(header_bytes)
    for size in range(len(header_bytes)):
        assert parse_header(header_bytes[:size]) is None, size


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    st.data(),
    ports,
    ports,
    payloads,
)
def test_v1_parse_of_build_is_identity(
    family: socket.AddressFamily, data: st.DataObject, sport: int, dport: int, payload: bytes
) -> None:
    hosts = ipv4 if family == socket.AF_INET else ipv6
    source, destination = (data.draw(hosts), sport), (data.draw(hosts), dport)
    name = "TCP4" if family == socket.AF_INET else "TCP6"
    expected = (
        False,
        family,
        accept_style(family, source),
        accept_style(family, destination),
    )
    assert_parses_back(build_v1(name, source, destination), payload, expected)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.sampled_from([socket.AF_INET, socket.AF_INET6]),
    st.data(),
    ports,
    ports,
    st.binary(max_size=32).map(lambda value: struct.pack("!BH", 0x04, len(value)) + value),
    payloads,
)
def test_v2_parse_of_build_is_identity(
    family: socket.AddressFamily,
    data: st.DataObject,
    sport: int,
    dport: int,
    noop_tlv: bytes,
    payload: bytes,
) -> None:
    # A PP2_TYPE_NOOP TLV (which every receiver skips) after the addresses.
    hosts = ipv4 if family == socket.AF_INET else ipv6
    source, destination = (data.draw(hosts), sport), (data.draw(hosts), dport)
    expected = (
        False,
        family,
        accept_style(family, source),
        accept_style(family, destination),
    )
    assert_parses_back(build_v2(family, source, destination, noop_tlv), payload, expected)


@settings(max_examples=200, deadline=None, database=None)
@given(unix_paths, unix_paths, payloads)
def test_v2_unix_parse_of_build_is_identity(source: str, destination: str, payload: bytes) -> None:
    expected = (False, socket.AF_UNIX, source, destination)
    assert_parses_back(build_v2(socket.AF_UNIX, source, destination), payload, expected)


@settings(max_examples=50, deadline=None, database=None)
@given(payloads)
def test_headers_naming_no_client_parse_back_to_none(payload: bytes) -> None:
    assert_parses_back(b"PROXY UNKNOWN\r\n", payload, (False, None, None, None))
    assert_parses_back(
        build_v1("UNKNOWN", ("::1", 1), ("::1", 2)).replace(b"UNKNOWN", b"UNKNOWN", 1),
        payload,
        (False, None, None, None),
    )
    assert_parses_back(build_v2(None, None, None), payload, (True, None, None, None))
