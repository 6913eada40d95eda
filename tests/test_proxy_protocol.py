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
