"""The PROXY protocol path (``haproxy:`` endpoints): every byte delivered, every
connection bounded, every refusal logged, no address believed from a stranger.

Real servers on real sockets, clients that are plain sockets (what a load
balancer is, to us), and the parser on its own for the splits no kernel
guarantees to produce.  Where the stdlib has the same path (a client's
half-close, an address in use) the same scenario runs against
``socketserver`` on a plain socket and the answers are compared.
"""

from __future__ import annotations

import errno
import gc
import socket
import socketserver
import struct
import threading
from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent

import twisted
import txsocketserver
from support import LOCALHOST, WAIT, connect, recv_all, serve_in_thread, wait_until
from twisted_world_handlers import AddressHandler, MeasuredReplyHandler, measured_reply
from txsocketserver._twisted.proxy_protocol import (
    ProxyHeaderError,
    TrustedProxies,
    parse_header,
)

PROXIED = f"haproxy:tcp:0:interface={LOCALHOST}"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1_header(source: tuple[str, int] = ("10.1.2.3", 5555)) -> bytes:
    return f"PROXY TCP4 {source[0]} 127.0.0.1 {source[1]} 80\r\n".encode()


def v2_header(source: tuple[str, int] = ("10.1.2.3", 5555), command: int = 1) -> bytes:
    addresses = (
        socket.inet_aton(source[0])
        + socket.inet_aton("127.0.0.1")
        + struct.pack("!HH", source[1], 80)
    )
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", 12) + addresses


def messages(events: list[dict[str, Any]], level: str | None = None) -> list[str]:
    return [
        formatEvent(event) for event in events if level is None or event["log_level"].name == level
    ]


class Counting(txsocketserver.ThreadingTCPServer):
    """Counts the handlers it creates, and lets only 10.1.0.0/16 in (a
    ``verify_request`` that relies on the client address being true)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handled: list[Any] = []
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return bool(client_address[0].startswith("10.1."))

    def finish_request(self, request: Any, client_address: Any) -> None:
        self.handled.append(client_address)
        super().finish_request(request, client_address)


# -- the parser: any split, both versions --------------------------------------------


@pytest.mark.parametrize("header", [v1_header(), v2_header()], ids=["v1", "v2"])
def test_a_header_split_anywhere_is_waited_for_then_parsed(header: bytes) -> None:
    payload = b"GET / HTTP/1.0\r\n\r\n"
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None, cut
    parsed = parse_header(header + payload)
    assert parsed is not None
    assert (parsed.local, parsed.source, parsed.length) == (False, ("10.1.2.3", 5555), len(header))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.0\r\n",
        b"PROXY TCP4 10.1.2.3\r\n",
        b"PROXY TCP4 10.1.2.3 1.2.3.4 5 99999\r\n",
        b"PROXY " + b"x" * 120,
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        V2_SIGNATURE + b"\x31\x11\x00\x00",
    ],
    ids=["http", "short", "port", "long", "family", "version"],
)
def test_a_bad_header_is_refused_as_soon_as_it_is_bad(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(data)


def test_trusted_proxies_match_addresses_networks_and_mapped_ipv4() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "192.0.2.7", "fd00::/8"])
    assert trusted.trusts(("10.200.1.1", 1))
    assert trusted.trusts(("::ffff:10.0.0.1", 1, 0, 0))
    assert trusted.trusts(("fd00::5", 1, 0, 0))
    assert not trusted.trusts(("192.0.2.8", 1))
    assert not trusted.trusts(("127.0.0.1", 1))
    assert trusted.trusts("")  # a Unix socket peer: the file's permissions decide
    assert TrustedProxies(["*"]).trusts(("203.0.113.9", 1))
    with pytest.raises(ValueError, match="'nonsense'"):
        TrustedProxies(["nonsense"])


def test_the_accept_batch_is_capped_to_the_free_slots() -> None:
    # Twisted's port accepts a batch per read, stopReading or not: the
    # listener sizes that batch to the free slots (compat.cap_accept_batch).
    with txsocketserver.ThreadingTCPServer(PROXIED, AddressHandler) as server:
        port = server._listener._port
        assert isinstance(port.numberAccepts, int)
        assert port.numberAccepts <= server.request_queue_size == 50


# -- item 1: a client's half-close, differential against the stdlib ------------------


def half_closed_request(address: Any, prefix: bytes, body: bytes) -> bytes:
    with connect(address) as client:
        client.sendall(prefix + b"eof\n" + body)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


@pytest.mark.parametrize("where", ["stdlib tcp", "tcp:", "haproxy: v1", "haproxy: v2"])
def test_a_half_closed_request_gets_its_whole_reply(where: str) -> None:
    body = bytes(range(256)) * 400
    server_class: Any = socketserver.ThreadingTCPServer
    address: Any = (LOCALHOST, 0)
    prefix = b""
    if where != "stdlib tcp":
        server_class = txsocketserver.ThreadingTCPServer
        address = PROXIED if where.startswith("haproxy") else f"tcp:0:interface={LOCALHOST}"
        prefix = {"haproxy: v1": v1_header(), "haproxy: v2": v2_header()}.get(where, b"")
    with server_class(address, MeasuredReplyHandler) as server, serve_in_thread(server):
        for _ in range(3):
            assert half_closed_request(server.server_address, prefix, body) == measured_reply(body)


# -- item 2: split headers on a real connection ---------------------------------------


@pytest.mark.parametrize("header", [v1_header(), v2_header()], ids=["v1", "v2"])
def test_a_header_sent_byte_by_byte_is_accepted(header: bytes) -> None:
    with txsocketserver.ThreadingTCPServer(PROXIED, AddressHandler) as server:
        with serve_in_thread(server), connect(server.server_address) as client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in header:
                client.sendall(bytes([byte]))
            assert b'"client": ["10.1.2.3", 5555]' in recv_all(client)


# -- item 3: a deadline before the header ---------------------------------------------


@pytest.mark.parametrize(
    "sent", [b"", b"PROXY TCP4 10.1.", V2_SIGNATURE[:7]], ids=["silent", "half v1", "half v2"]
)
def test_a_client_that_never_completes_its_header_is_closed_and_logged(
    sent: bytes, events: list[dict[str, Any]]
) -> None:
    with Counting(PROXIED, AddressHandler) as server, serve_in_thread(server):
        server.header_timeout = 0.3
        with connect(server.server_address) as client:
            client.sendall(sent)
            assert recv_all(client) == b""  # closed by the server, well within WAIT
            port = client.getsockname()[1]
        assert wait_until(lambda: messages(events, "warn"))
        [line] = messages(events, "warn")
        assert f"'127.0.0.1', {port})" in line and "no complete PROXY header within 0.3s" in line
        assert server.handled == []


# -- items 4 and 5: refusals are logged once; health checks are quiet -----------------


def test_a_malformed_header_is_refused_with_one_warning(events: list[dict[str, Any]]) -> None:
    with Counting(PROXIED, AddressHandler) as server, serve_in_thread(server):
        with connect(server.server_address) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert recv_all(client) == b""
            port = client.getsockname()[1]
        assert wait_until(lambda: messages(events))
        assert messages(events) == [
            f"refused connection from ('127.0.0.1', {port}): not a PROXY protocol header"
        ]
        assert server.handled == []


def test_a_local_health_check_is_served_as_the_proxy_itself(
    events: list[dict[str, Any]],
) -> None:
    # The PROXY spec: a LOCAL connection is the proxy's own (a health check),
    # served with the connection's real addresses; an HTTP check waits for
    # its answer.  One debug line each, nothing louder.
    class Admitting(Counting):
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return True

    with Admitting(PROXIED, AddressHandler) as server, serve_in_thread(server):
        ports = []
        for _ in range(3):
            with connect(server.server_address) as client:
                client.sendall(v2_header(command=0))
                ports.append(client.getsockname()[1])
                assert f'["127.0.0.1", {ports[-1]}]'.encode() in recv_all(client)
        assert wait_until(lambda: len(messages(events)) == 3)
        assert all(
            "PROXY LOCAL connection (a health check)" in m for m in messages(events, "debug")
        )
        assert messages(events) == messages(events, "debug")
        with connect(server.server_address) as client:
            client.sendall(v2_header())
            assert b"10.1.2.3" in recv_all(client)
        assert server.handled == [("127.0.0.1", port) for port in ports] + [("10.1.2.3", 5555)]


def reset(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


class ResetReading(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.reading.set()
        self.request.recv(10)  # ConnectionResetError: the client was a health check


def test_a_connection_reset_before_any_payload_is_not_a_handler_error(
    events: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    with txsocketserver.ThreadingTCPServer(PROXIED, ResetReading) as server:
        server.reading = threading.Event()
        with serve_in_thread(server):
            client = connect(server.server_address)
            client.sendall(v1_header())
            assert server.reading.wait(WAIT)
            reset(client)
            assert wait_until(lambda: messages(events))
    assert messages(events, "debug") == [
        "connection from ('10.1.2.3', 5555) ended before sending anything"
    ]
    assert "Traceback" not in capfd.readouterr().err


# -- item 7: an address in use is an OSError with EADDRINUSE ---------------------------


# Twisted before 26 does not close the socket of a port that failed to bind
# (tcp.Port.startListening; fixed in 26.4): its finalizer closes it, with a
# ResourceWarning that nothing outside Twisted can prevent.  Only there, only here.
_TWISTED_LEAKS_FAILED_PORTS = int(twisted.__version__.split(".")[0]) < 26


@pytest.mark.parametrize("where", ["stdlib", "tcp:", "haproxy:"])
@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning" if _TWISTED_LEAKS_FAILED_PORTS else "default"
)
def test_an_address_in_use_is_an_oserror_with_eaddrinuse(where: str) -> None:
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        if where == "stdlib":
            server_class: Any = socketserver.TCPServer
            address: Any = (LOCALHOST, port)
        else:
            server_class = txsocketserver.TCPServer
            address = f"{where}{'tcp:' if where == 'haproxy:' else ''}{port}:interface={LOCALHOST}"
        with pytest.raises(OSError) as caught:
            server_class(address, AddressHandler)
        assert caught.value.errno == errno.EADDRINUSE
        if where == "haproxy:":
            assert isinstance(caught.value.__cause__, CannotListenError)
    del caught
    gc.collect()  # finalize what a failed port left (see above) while the filter holds


# -- item 8: only trusted proxies may name the client ----------------------------------


def test_a_spoofing_client_is_refused_and_a_trusted_proxy_served(
    events: list[dict[str, Any]],
) -> None:
    with Counting(PROXIED, AddressHandler) as server, serve_in_thread(server):
        # Our test client at 127.0.0.1 plays a stranger, then the proxy.
        server.trusted_proxies = ("192.0.2.0/24",)
        with connect(server.server_address) as client:
            client.sendall(v1_header(("10.1.2.3", 4000)))
            assert recv_all(client) == b""
            port = client.getsockname()[1]
        assert wait_until(lambda: messages(events))
        [line] = messages(events, "warn")
        assert line.startswith(
            f"refused connection from ('127.0.0.1', {port}): not a trusted proxy"
        )
        assert server.handled == []
        server.trusted_proxies = ("127.0.0.1",)
        with connect(server.server_address) as client:
            client.sendall(v1_header(("10.1.2.3", 4001)))
            assert b'"client": ["10.1.2.3", 4001]' in recv_all(client)
        assert server.handled == [("10.1.2.3", 4001)]


def test_loopback_is_the_only_default_trusted_proxy() -> None:
    assert txsocketserver.TCPServer.trusted_proxies == ("127.0.0.1", "::1")


# -- PROXY v2 TLVs -------------------------------------------------------------------


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2_with_tlvs(tlvs: bytes, source: tuple[str, int] = ("10.1.2.3", 5555)) -> bytes:
    addresses = (
        socket.inet_aton(source[0])
        + socket.inet_aton("127.0.0.1")
        + struct.pack("!HH", source[1], 80)
    )
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def ssl_tlv(*subs: bytes, client: int = 0x07, verify: int = 0) -> bytes:
    return tlv(0x20, bytes([client]) + struct.pack("!I", verify) + b"".join(subs))


EVERY_TLV = (
    tlv(0x01, b"h2")
    + tlv(0x02, b"api.example.com")
    + tlv(0x05, b"\x01unique-42")
    + ssl_tlv(
        tlv(0x21, b"TLSv1.3"),
        tlv(0x22, b"billing"),
        tlv(0x23, b"TLS_AES_256_GCM_SHA384"),
        tlv(0x24, b"SHA256"),
        tlv(0x25, b"EC256"),
        tlv(0x2F, b"future"),
    )
    + tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")
    + tlv(0xEE, b"\x01" + struct.pack("<I", 0x01020304))
    + tlv(0xE0, struct.pack("!Q", 1234567890123))
    + tlv(0x30, b"blue")
    + tlv(0xE5, b"custom one")
    + tlv(0xE5, b"custom two")
    + tlv(0x04, b"")
)


def test_every_known_tlv_is_decoded_and_the_rest_kept_raw() -> None:
    header = parse_header(v2_with_tlvs(EVERY_TLV) + b"payload")
    assert header is not None
    tlvs = header.tlvs
    assert tlvs.alpn == b"h2"
    assert tlvs.authority == "api.example.com"
    assert tlvs.unique_id == b"\x01unique-42"
    assert tlvs.ssl is not None
    assert tlvs.ssl.client_ssl and tlvs.ssl.client_cert_connection and tlvs.ssl.verified
    assert (tlvs.ssl.version, tlvs.ssl.cn, tlvs.ssl.cipher) == (
        "TLSv1.3",
        "billing",
        "TLS_AES_256_GCM_SHA384",
    )
    assert (tlvs.ssl.sig_alg, tlvs.ssl.key_alg) == ("SHA256", "EC256")
    assert tlvs.ssl.other[0x2F] == (b"future",)
    assert tlvs.aws_vpce_id == "vpce-08d2bf15fac5001c9"
    assert tlvs.azure_link_id == 0x01020304
    assert tlvs.gcp_psc_id == 1234567890123
    assert tlvs.netns == "blue"
    assert tlvs.raw[0xE5] == (b"custom one", b"custom two")
    assert tlvs.raw[0x01] == (b"h2",)
    assert header.source == ("10.1.2.3", 5555)


def test_tlvs_are_read_only() -> None:
    header = parse_header(v2_with_tlvs(EVERY_TLV))
    assert header is not None
    with pytest.raises(AttributeError):
        header.tlvs.authority = "evil.example.com"  # type: ignore[misc]
    with pytest.raises(TypeError):
        header.tlvs.raw[0xE5] = (b"x",)  # type: ignore[index]


def test_a_header_without_tlvs_has_empty_ones() -> None:
    header = parse_header(v2_header())
    assert header is not None and header.tlvs.raw == {} and header.tlvs.ssl is None
    v1 = parse_header(v1_header())
    assert v1 is not None and v1.tlvs.authority is None


def test_a_crc32c_tlv_is_verified() -> None:
    from txsocketserver._twisted.proxy_protocol import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    blank = v2_with_tlvs(tlv(0x02, b"a.example") + tlv(0x03, bytes(4)))
    checksum = struct.pack("!I", crc32c(blank))
    good = blank[:-4] + checksum
    header = parse_header(good)
    assert header is not None and header.tlvs.authority == "a.example"
    bad = blank[:-4] + struct.pack("!I", crc32c(blank) ^ 1)
    with pytest.raises(ProxyHeaderError, match="CRC32c"):
        parse_header(bad)


BAD_TLVS = {
    "truncated TLV header": b"\x02\x00",
    "length overruns": tlv(0x02, b"abc")[:-1] + b"",
    "length far past the end": b"\x02\xff\xff" + b"x" * 10,
    "SSL TLV too short": tlv(0x20, b"\x01\x00"),
    "nested SSL sub-TLV overruns": tlv(0x20, b"\x01" + bytes(4) + b"\x22\x00\x50cn"),
    "nested SSL sub-TLV truncated": tlv(0x20, b"\x01" + bytes(4) + b"\x22"),
    "authority not UTF-8": tlv(0x02, b"\xff\xfe"),
    "unique ID too long": tlv(0x05, b"u" * 129),
    "Azure link ID wrong size": tlv(0xEE, b"\x01\x00"),
    "GCP ID wrong size": tlv(0xE0, b"\x00" * 3),
    "CRC32c wrong size": tlv(0x03, b"\x00"),
    "too many TLVs": tlv(0x04, b"") * 65,
}


@pytest.mark.parametrize("tlvs", BAD_TLVS.values(), ids=BAD_TLVS.keys())
def test_bad_tlvs_raise_the_parsers_error(tlvs: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse_header(v2_with_tlvs(tlvs))


class TLVHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        header = self.request.proxy_header
        self.request.sendall(
            f"{self.client_address[0]} {header.tlvs.authority} {header.tlvs.ssl.cn}\n".encode()
        )


class AsyncTLVHandler(txsocketserver.AsyncBaseRequestHandler):
    async def handle(self) -> None:
        header = self.request.proxy_header
        reply = f"{self.client_address[0]} {header.tlvs.authority} {header.tlvs.ssl.cn}\n"
        await self.request.sendall(reply.encode())


TLV_SERVERS = {
    "sync": (txsocketserver.TCPServer, TLVHandler),
    "threading": (txsocketserver.ThreadingTCPServer, TLVHandler),
    "async": (txsocketserver.TCPServer, AsyncTLVHandler),
}


@pytest.mark.parametrize("kind", TLV_SERVERS)
def test_the_handler_reads_the_tlvs_and_bad_ones_are_refused(
    kind: str, events: list[dict[str, Any]]
) -> None:
    server_class, handler = TLV_SERVERS[kind]
    with server_class(PROXIED, handler) as server, serve_in_thread(server):
        with connect(server.server_address) as client:
            client.sendall(v2_with_tlvs(EVERY_TLV))
            assert recv_all(client) == b"10.1.2.3 api.example.com billing\n"
        for bad in BAD_TLVS.values():
            with connect(server.server_address) as client:
                client.sendall(v2_with_tlvs(bad))
                assert recv_all(client) == b""
        assert wait_until(lambda: len(messages(events, "warn")) >= len(BAD_TLVS))
        assert all("refused connection" in line for line in messages(events, "warn"))
        with connect(server.server_address) as client:
            client.sendall(v2_with_tlvs(EVERY_TLV))
            assert recv_all(client) == b"10.1.2.3 api.example.com billing\n"


# -- haproxy:ssl: the PROXY header in clear, then TLS ---------------------------------


class TLSAddressHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        line = f"{self.client_address[0]} {self.request.version()} {type(self.request).__name__}"
        self.wfile.write(line.encode() + b"\n")


class AsyncTLSAddressHandler(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        await self.rfile.readline()
        line = f"{self.client_address[0]} {self.request.version()} {type(self.request).__name__}"
        self.wfile.write(line.encode() + b"\n")


TLS_KINDS = {
    "sync": (txsocketserver.TCPServer, TLSAddressHandler),
    "threading": (txsocketserver.ThreadingTCPServer, TLSAddressHandler),
    "async": (txsocketserver.TCPServer, AsyncTLSAddressHandler),
}


def haproxy_ssl(cert: Any, **options: str) -> str:
    from twisted.internet.endpoints import quoteStringArgument

    extra = "".join(f":{k}={quoteStringArgument(v)}" for k, v in options.items())
    return (
        f"haproxy:ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}{extra}"
    )


def proxied_tls_request(address: Any, cert: Any, header: bytes, together: bool = True) -> bytes:
    """Send *header* in clear, then speak TLS on the same connection."""
    import ssl

    context = ssl.create_default_context(cafile=cert.cert_path)
    with connect(address) as raw:
        raw.sendall(header)
        with context.wrap_socket(raw, server_hostname=LOCALHOST) as tls:
            tls.sendall(b"hello\n")
            return recv_all(tls)


@pytest.mark.parametrize("kind", TLS_KINDS)
def test_haproxy_ssl_reads_the_header_before_the_handshake(kind: str, tls_cert: Any) -> None:
    server_class, handler = TLS_KINDS[kind]
    with server_class(haproxy_ssl(tls_cert), handler) as server, serve_in_thread(server):
        for header in (v1_header(("10.1.2.3", 4000)), v2_with_tlvs(EVERY_TLV)):
            reply = proxied_tls_request(server.server_address, tls_cert, header)
            assert reply.startswith(b"10.1.2.3 TLSv1.3 ")


@pytest.mark.parametrize("kind", TLS_KINDS)
def test_haproxy_ssl_refuses_an_untrusted_peer_and_a_bad_header(
    kind: str, tls_cert: Any, events: list[dict[str, Any]]
) -> None:
    import ssl

    server_class, handler = TLS_KINDS[kind]
    with server_class(haproxy_ssl(tls_cert), handler) as server, serve_in_thread(server):
        server.trusted_proxies = ("192.0.2.0/24",)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            proxied_tls_request(server.server_address, tls_cert, v1_header())
        assert wait_until(lambda: any("not a trusted proxy" in m for m in messages(events)))
        server.trusted_proxies = ("127.0.0.1",)
        # TLS straight away (no header) is a bad header, refused and logged.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            proxied_tls_request(server.server_address, tls_cert, b"")
        assert wait_until(
            lambda: any("not a PROXY protocol header" in m for m in messages(events))
        )
        reply = proxied_tls_request(server.server_address, tls_cert, v1_header())
        assert reply.startswith(b"10.1.2.3 TLSv1.3")


@pytest.mark.parametrize("kind", TLS_KINDS)
def test_haproxy_ssl_bounds_the_handshake_after_the_header(
    kind: str, tls_cert: Any, events: list[dict[str, Any]]
) -> None:
    server_class, handler = TLS_KINDS[kind]
    address = haproxy_ssl(tls_cert, handshakeTimeout="0.3")
    with server_class(address, handler) as server, serve_in_thread(server):
        with connect(server.server_address) as client:
            client.sendall(v1_header())
            # Aborted (a reset): a close would wait to send TLS's close_notify.
            with pytest.raises(ConnectionResetError):
                recv_all(client)
        assert wait_until(lambda: any("timed out" in m for m in messages(events)))
