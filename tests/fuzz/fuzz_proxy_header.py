"""Fuzz the PROXY protocol header parser (``proxy_protocol.parse_header``), v1 and v2.

Documented failure: ``ProxyHeaderError``.  Invariants checked on every input:

* a header found is no longer than the bytes, parses the same from its own
  bytes alone (what follows is payload), and every proper prefix of it is
  "need more" (``None``): a header split anywhere is waited for;
* an error is final: more bytes after a bad beginning are still an error;
* "need more" is only ever said for fewer bytes than the longest header;
* the addresses are what ``socket.accept()`` gives for the family;
* whatever TLVs the header carries pass :func:`check_tlvs`.

Inputs are raw bytes, or (picked by the first byte) a v1 line or a v2 block
assembled from the input, with TLVs, so that the fuzzer spends its time past
the signature.

Run: ``python tests/fuzz/fuzz_proxy_header.py CORPUS_DIR [libFuzzer options]``
(``tests/fuzz/run.py`` runs every harness; docs/reliability.md).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from _harness import FuzzInput, fuzz, instrumented

with instrumented("txsocketserver"):
    from txsocketserver._twisted import proxy_protocol
    from txsocketserver._twisted.proxy_protocol import ProxyHeaderError, parse_header

V2_SIGNATURE = proxy_protocol.V2_SIGNATURE
# The longest header there is: v2's fixed part and a 16-bit length.
LONGEST = proxy_protocol.V2_FIXED_LENGTH + 0xFFFF

# PROXY v2 TLV types (the specification's section 2.2); 0x20 is PP2_TYPE_SSL,
# whose value holds sub-TLVs.
TLV_TYPES = [0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x30, 0xE0, 0xEE]
SSL_SUBTYPES = [0x21, 0x22, 0x23, 0x24, 0x25]
FAMILIES = [0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]
ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}


def tlv(kind: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack("!BH", kind, len(value) if length is None else length) + value


def build_tlvs(given: FuzzInput, depth: int = 0) -> bytes:
    """A TLV area: mostly well-formed, sometimes with a length that lies."""
    area = b""
    for _ in range(given.below(6)):
        kind = given.int() if given.below(8) == 0 else TLV_TYPES[given.below(len(TLV_TYPES))]
        if kind == 0x20 and depth == 0:
            # PP2_TYPE_SSL: client flags, verify result, then sub-TLVs.
            value = given.bytes(1).ljust(1, b"\0") + given.bytes(4).ljust(4, b"\0")
            value += build_tlvs(given, depth + 1)
        elif kind == 0x03:
            value = b"\0\0\0\0"  # CRC32c, filled in by build_v2 when asked
        else:
            value = given.bytes(given.below(40))
        lie = given.below(16) == 0
        area += tlv(kind, value, given.int(2) if lie else None)
    return area


def build_v2(given: FuzzInput) -> bytes:
    version_command = given.int() if given.below(8) == 0 else given.choice([0x21, 0x20])
    family = given.int() if given.below(8) == 0 else FAMILIES[given.below(len(FAMILIES))]
    size = ADDRESS_SIZES.get(family >> 4, 0)
    if given.below(8) == 0:
        size = given.below(size + 8)
    addresses = given.bytes(size).ljust(size, b"\0")
    tlvs = build_tlvs(given)
    body = addresses + tlvs
    length = len(body) if given.below(8) else given.int(2)
    header = V2_SIGNATURE + struct.pack("!BBH", version_command, family, length) + body
    crc32c = getattr(proxy_protocol, "crc32c", None)
    at = header.find(b"\x03\x00\x04\x00\x00\x00\x00", 16 + size)
    if crc32c is not None and at >= 0 and given.below(2):
        # A correct checksum, so that the fuzzer gets past it.
        header = header[: at + 3] + struct.pack("!I", crc32c(header)) + header[at + 7 :]
    return header + given.rest()


def build_v1(given: FuzzInput) -> bytes:
    protocol = given.choice([b"TCP4", b"TCP6", b"UNKNOWN", given.bytes(5)])
    if protocol == b"TCP6":
        hosts = [str(ipaddress.IPv6Address(given.int(16))).encode() for _ in range(2)]
    else:
        hosts = [str(ipaddress.IPv4Address(given.int(4))).encode() for _ in range(2)]
    ports = [str(given.int(3) % 70000).encode() for _ in range(2)]
    fields = [b"PROXY", protocol, *hosts, *ports]
    if given.below(4) == 0:
        fields[given.below(len(fields))] = given.bytes(given.below(12))
    return b" ".join(fields) + given.choice([b"\r\n", b"\n", b"\r", b""]) + given.rest()


def build(data: bytes) -> bytes:
    """The bytes a connection starts with, made from the fuzzer's *data*."""
    given = FuzzInput(data)
    mode = given.int() % 3
    if mode == 1:
        return build_v2(given)
    if mode == 2:
        return build_v1(given)
    return given.rest()


def check_addresses(header: proxy_protocol.ProxyHeader) -> None:
    if header.family is None:
        assert header.source is None and header.destination is None, header
        return
    for address in (header.source, header.destination):
        if header.family == socket.AF_UNIX:
            assert isinstance(address, str), header
            assert "\0" not in address, header
            continue
        assert isinstance(address, tuple), header
        host, port = address[0], address[1]
        assert 0 <= port <= 0xFFFF, header
        parsed = ipaddress.ip_address(host)
        if header.family == socket.AF_INET:
            assert len(address) == 2 and parsed.version == 4, header
        else:
            assert header.family == socket.AF_INET6, header
            assert address[2:] == (0, 0) and parsed.version == 6, header


def check_tlvs(header: proxy_protocol.ProxyHeader, data: bytes) -> None:
    """Invariants of the TLVs a v2 header carries.

    Where the TLV parser's own checks go: this module's ``parse_header``
    returns the TLVs with the header (the ``tlvs`` field, when the PROXY v2
    TLV support is there), and whatever it gives must come from inside the
    header's bytes.  Add assertions about its fields here as it grows; the
    inputs already carry TLVs (``build_tlvs``), SSL sub-TLVs and CRC32c.
    """
    tlvs = getattr(header, "tlvs", None)
    if tlvs is None:
        return
    repr(tlvs)  # every field is a plain value
    for value in _leaves(tlvs):
        if isinstance(value, bytes) and value:
            assert value in data[: header.length], (header, value)


def _leaves(value: object) -> list[object]:
    if isinstance(value, tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def prefixes(length: int) -> range | list[int]:
    """The proper prefix lengths worth checking: all of them for short headers."""
    if length <= 256:
        return range(length)
    return sorted({0, 1, 15, 16, 17, length // 2, length - 2, length - 1})


def check(data: bytes) -> None:
    data = build(data)
    try:
        header = parse_header(data)
    except ProxyHeaderError:
        try:
            parse_header(data + b"\r\n" + bytes(64))
        except ProxyHeaderError:
            return
        raise AssertionError("an error was undone by more bytes") from None
    if header is None:
        assert len(data) < LONGEST, len(data)
        return
    assert 0 < header.length <= len(data), header
    assert parse_header(data[: header.length]) == header, header
    for size in prefixes(header.length):
        assert parse_header(data[:size]) is None, (size, header)
    check_addresses(header)
    check_tlvs(header, data)


if __name__ == "__main__":
    sys.exit(fuzz(check))
