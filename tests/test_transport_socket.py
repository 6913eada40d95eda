"""TransportSocket: blocking handler code over Twisted transports, on real sockets.

Each test listens on a real endpoint (``tcp:``, ``ssl:``, ``haproxy:``,
``unix:``) of the shared background reactor and runs its handler in a plain
thread, as the servers do.  Clients are plain (or ``ssl``-wrapped) sockets.
Assertions made in handler threads are collected and re-raised by the test.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import http.server
import os
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from support import SelfSignedCert
from txsocketserver._twisted.endpoints import proxy_protocol_endpoint
from txsocketserver._twisted.proxy_protocol import TrustedProxies
from txsocketserver._twisted.transport_socket import (
    RECEIVE_HIGH_WATER,
    SEND_WINDOW,
    ProxyHeaderPolicy,
    SocketAddress,
    TransportSocket,
    TransportSocketProtocol,
)

# Bound for every wait on the other side of a connection.
WAIT = 10.0

Handler = Callable[[TransportSocket, SocketAddress], None]


class _ModuleHold:
    """What holds the reactor for this module's tests."""


@pytest.fixture(scope="module")
def reactor() -> Iterator[Any]:
    """The package's shared background reactor, started if nobody runs it,
    and held while this module's tests run."""
    from txsocketserver._twisted import reactor as _reactor

    owner = _ModuleHold()
    yield _reactor.hold(owner)
    _reactor.release(owner)


@pytest.fixture(autouse=True)
def no_logged_errors() -> Iterator[None]:
    """Fail the test if anything on the reactor side logged a failure."""
    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event["log_failure"])

    globalLogPublisher.addObserver(observe)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [failure.getTraceback() for failure in failures]


def on_reactor(reactor: Any, function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` on the reactor thread; wait for it (and its Deferred)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def fail(failure: Failure) -> None:
        future.set_exception(failure.value)

    def run() -> None:
        maybeDeferred(function, *args).addCallbacks(future.set_result, fail)

    reactor.callFromThread(run)
    return future.result(WAIT)


@dataclass
class Served:
    """A listening endpoint; each connection runs the handler in its own thread."""

    port: int = 0
    sockets: list[TransportSocket] = field(default_factory=list)
    addresses: list[SocketAddress] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)

    def socket(self) -> TransportSocket:
        """The server side of the first connection, once it exists."""
        assert self.connected.wait(WAIT), "no connection reached the handler"
        return self.sockets[0]


@contextlib.contextmanager
def serving(reactor: Any, description: str, handler: Handler) -> Iterator[Served]:
    """Listen on ``description``; run ``handler(sock, address)`` per connection.

    The handler's socket is closed when it returns.  On exit, handler threads
    are joined, the port is closed and the first handler error is raised.
    """
    served = Served()

    def run(sock: TransportSocket, address: SocketAddress) -> None:
        try:
            handler(sock, address)
        except BaseException as error:
            served.errors.append(error)
        finally:
            sock.close()

    def on_connection(sock: TransportSocket, address: SocketAddress) -> None:
        thread = threading.Thread(target=run, args=(sock, address), daemon=True)
        served.sockets.append(sock)
        served.addresses.append(address)
        served.threads.append(thread)
        thread.start()
        served.connected.set()

    endpoint = serverFromString(reactor, description)
    # As EndpointListener does: a PROXY-protocol endpoint is served by our own
    # header stage on the endpoint it wraps.
    inner = proxy_protocol_endpoint(endpoint)
    policy = ProxyHeaderPolicy(TrustedProxies(["127.0.0.1"]), WAIT) if inner else None
    factory = Factory.forProtocol(
        lambda: TransportSocketProtocol(on_connection, reactor=reactor, proxy=policy)
    )
    port = on_reactor(reactor, lambda: (inner or endpoint).listen(factory))
    served.port = getattr(port.getHost(), "port", 0)
    try:
        yield served
    finally:
        for thread in served.threads:
            thread.join(WAIT)
        on_reactor(reactor, port.stopListening)
        assert not any(thread.is_alive() for thread in served.threads), "handler hung"
    if served.errors:
        raise served.errors[0]


TCP = "tcp:0:interface=127.0.0.1"


def ssl_description(cert: SelfSignedCert) -> str:
    return (
        "ssl:0:interface=127.0.0.1"
        f":privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}"
    )


@contextlib.contextmanager
def connect(served: Served, cert: SelfSignedCert | None = None) -> Iterator[socket.socket]:
    """A client connection to ``served``, TLS-wrapped (and verified) given a cert."""
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=WAIT)
    if cert is not None:
        context = ssl.create_default_context(cafile=cert.cert_path)
        sock = context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        yield sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def transport_write_buffer(transport: Any) -> int:
    """Bytes Twisted buffers for writing in ``transport`` and the transports below it.

    Reads Twisted's private buffers on purpose: this is the memory the flow
    control must bound.  Call on the reactor thread.
    """
    total = 0
    while transport is not None:
        total += len(getattr(transport, "_appSendBuffer", ()) or ())
        if hasattr(transport, "dataBuffer"):
            total += len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        transport = getattr(transport, "__dict__", {}).get("transport")
    return total


def echo(sock: TransportSocket, address: SocketAddress) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


@pytest.mark.parametrize("scheme", ["tcp", "ssl"])
def test_echo_with_recv_and_sendall(reactor: Any, tls_cert: SelfSignedCert, scheme: str) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    description = TCP if scheme == "tcp" else ssl_description(tls_cert)
    cert = tls_cert if scheme == "ssl" else None
    with serving(reactor, description, echo) as served, connect(served, cert) as client:
        # One thread, in lock-step: an ssl.SSLSocket must not be read and
        # written from two threads at once (3.10 corrupts the stream).
        received = bytearray()
        for start in range(0, len(payload), 64 * 1024):
            chunk = payload[start : start + 64 * 1024]
            client.sendall(chunk)
            want = len(received) + len(chunk)
            while len(received) < want:
                data = client.recv(1 << 20)
                assert data
                received += data
        assert received == payload


def test_makefile_readline_and_write(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        with sock.makefile("rb") as rfile, sock.makefile("wb") as wfile:
            while line := rfile.readline(65537):
                wfile.write(line.upper())
                wfile.flush()
        with sock.makefile("w", encoding="utf-8", newline="\r\n") as text:
            text.write("done\n")

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        with client.makefile("rwb") as stream:
            stream.write(b"hello\nwor")
            stream.flush()
            assert stream.readline() == b"HELLO\n"
            stream.write(b"ld\n")
            stream.flush()
            assert stream.readline() == b"WORLD\n"
            client.shutdown(socket.SHUT_WR)
            assert stream.read() == b"done\r\n"


def test_stdlib_http_server_over_tls(
    reactor: Any, tls_cert: SelfSignedCert, tmp_path: Any
) -> None:
    body = os.urandom(2 * 1024 * 1024 + 17)
    (tmp_path / "blob.bin").write_bytes(body)
    server = SimpleNamespace(server_name="localhost", server_port=0)

    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        http.server.SimpleHTTPRequestHandler(sock, address, server, directory=str(tmp_path))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with serving(reactor, ssl_description(tls_cert), handler) as served:
        for _ in range(2):
            url = f"https://localhost:{served.port}/blob.bin"
            with urllib.request.urlopen(url, context=context, timeout=WAIT) as response:
                assert response.status == 200
                assert response.read() == body
        assert served.addresses[0][0] == "127.0.0.1"


def test_timeouts_and_non_blocking(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        assert sock.gettimeout() is None and sock.getblocking()
        sock.settimeout(0.2)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            sock.recv(10)
        assert 0.15 < time.monotonic() - started < 2.0
        sock.setblocking(False)
        assert sock.gettimeout() == 0.0 and not sock.getblocking()
        with pytest.raises(BlockingIOError):
            sock.recv(10)
        sock.setblocking(True)
        with pytest.raises(BlockingIOError):
            sock.recv(10, socket.MSG_DONTWAIT)
        with pytest.raises(ValueError):
            sock.settimeout(-1)
        sock.sendall(b"ready")
        assert sock.recv(10) == b"go"

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        assert client.recv(10) == b"ready"
        client.sendall(b"go")


def test_eof_then_reply_over_half_closed_connection(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        assert sock.recv(4, socket.MSG_PEEK) == b"ping"
        assert sock.recv(100, socket.MSG_WAITALL) == b"ping"
        assert sock.recv(100) == b""
        assert sock.recv(100) == b""
        sock.sendall(b"pong after EOF")
        sock.shutdown(socket.SHUT_WR)
        with pytest.raises(BrokenPipeError):
            sock.sendall(b"too late")

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b"pong after EOF"


def test_peer_reset_raises_connection_reset(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        assert sock.recv(1) == b"x"
        sock.sendall(b"ok")
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.sendall(b"nobody listens")

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        client.sendall(b"x")
        assert client.recv(2) == b"ok"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")


@pytest.mark.parametrize("scheme", ["tcp", "ssl"])
def test_close_sends_everything_written(
    reactor: Any, tls_cert: SelfSignedCert, scheme: str
) -> None:
    payload = os.urandom(10 * 1024 * 1024)

    closed = threading.Event()

    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        sock.sendall(payload)
        sock.close()
        closed.set()

    description = TCP if scheme == "tcp" else ssl_description(tls_cert)
    cert = tls_cert if scheme == "ssl" else None
    with serving(reactor, description, handler) as served, connect(served, cert) as client:
        # The handler's close() comes while what it wrote last is still
        # buffered (flow control lets sendall return a window ahead of the
        # client): none of it may be lost.
        assert read_to_eof(client) == payload
        assert closed.wait(WAIT)


@pytest.mark.parametrize("scheme", ["tcp", "ssl"])
def test_slow_reader_bounds_server_memory(
    reactor: Any, tls_cert: SelfSignedCert, scheme: str
) -> None:
    block = os.urandom(1024 * 1024)
    payload = b"".join(block[i:] + block[:i] for i in range(100))  # 100 MB
    expected = hashlib.sha256(payload).hexdigest()

    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        sock.sendall(payload)

    description = TCP if scheme == "tcp" else ssl_description(tls_cert)
    cert = tls_cert if scheme == "ssl" else None
    with serving(reactor, description, handler) as served, connect(served, cert) as client:
        server_side = served.socket()
        transport = server_side._protocol.transport
        peak = 0
        stop = time.monotonic() + 2.0
        while time.monotonic() < stop:  # the client does not read for 2 s
            buffered = on_reactor(reactor, transport_write_buffer, transport)
            peak = max(peak, buffered + server_side.pending_write_bytes)
            time.sleep(0.02)
        assert 0 < peak < 4 * 1024 * 1024
        assert server_side.pending_write_bytes <= SEND_WINDOW
        digest = hashlib.sha256()
        size = 0
        while chunk := client.recv(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        assert size == len(payload)
        assert digest.hexdigest() == expected


def test_writer_blocked_on_a_slow_reader_learns_that_it_left(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            sock.sendall(b"x" * (100 * 1024 * 1024))

    with serving(reactor, TCP, handler) as served:
        with connect(served) as client:
            client.recv(1)
            server_side = served.socket()
            deadline = time.monotonic() + WAIT
            while (
                on_reactor(reactor, transport_write_buffer, server_side._protocol.transport) == 0
            ):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        served.threads[0].join(WAIT)
        assert not served.threads[0].is_alive()


def test_busy_handler_bounds_incoming_buffer(reactor: Any) -> None:
    payload = os.urandom(50 * 1024 * 1024)
    may_read = threading.Event()
    outcome: list[str] = []

    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        assert may_read.wait(WAIT)
        digest = hashlib.sha256()
        buffer = bytearray(65536)
        while count := sock.recv_into(buffer):
            digest.update(buffer[:count])
        outcome.append(digest.hexdigest())
        sock.sendall(b"done")

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
        sender.start()
        server_side = served.socket()
        peak = 0
        stop = time.monotonic() + 2.0
        while time.monotonic() < stop:  # the handler is busy for 2 s
            peak = max(peak, server_side.buffered_read_bytes)
            time.sleep(0.02)
        assert RECEIVE_HIGH_WATER <= peak < RECEIVE_HIGH_WATER + 256 * 1024
        assert sender.is_alive(), "the client should be blocked by TCP flow control"
        may_read.set()
        sender.join(WAIT)
        client.shutdown(socket.SHUT_WR)
        assert read_to_eof(client) == b"done"
    assert outcome == [hashlib.sha256(payload).hexdigest()]


def test_blocking_calls_on_the_reactor_thread_raise(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        for call in (lambda: sock.recv(1), lambda: sock.sendall(b"x")):
            with pytest.raises(RuntimeError, match="reactor thread"):
                on_reactor(reactor, call)
        sock.sendall(b"ok")

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        assert read_to_eof(client) == b"ok"


def test_close_is_idempotent_and_later_calls_fail(reactor: Any) -> None:
    blocked_reader: list[BaseException] = []

    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        def read() -> None:
            try:
                sock.recv(1)
            except OSError as error:
                blocked_reader.append(error)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.1)
        with sock:
            sock.sendall(b"bye")
        reader.join(WAIT)
        sock.close()
        assert sock.fileno() == -1
        for call in (
            lambda: sock.recv(1),
            lambda: sock.sendall(b"x"),
            lambda: sock.shutdown(socket.SHUT_WR),
            sock.getpeername,
        ):
            with pytest.raises(OSError) as raised:
                call()
            assert raised.value.errno == errno.EBADF

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        assert read_to_eof(client) == b"bye"
    assert [error.errno for error in blocked_reader] == [errno.EBADF]  # type: ignore[attr-defined]


def test_open_makefile_keeps_the_connection_open(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        wfile = sock.makefile("wb", buffering=0)
        sock.close()
        wfile.write(b"still open")
        wfile.close()
        with pytest.raises(OSError):
            sock.sendall(b"x")

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        assert read_to_eof(client) == b"still open"


def test_sendfile_and_shutdown_read(reactor: Any, tmp_path: Any) -> None:
    content = os.urandom(700 * 1024)
    (tmp_path / "file.bin").write_bytes(content)

    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        sock.shutdown(socket.SHUT_RD)
        assert sock.recv(10) == b""
        with open(tmp_path / "file.bin", "rb") as file:
            assert sock.sendfile(file, offset=100, count=len(content)) == len(content) - 100

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        client.sendall(b"ignored")
        assert read_to_eof(client) == content[100:]


def test_addresses_descriptor_and_options(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        assert (sock.family, sock.type, sock.proto) == (socket.AF_INET, socket.SOCK_STREAM, 0)
        assert sock.getpeername() == address
        assert sock.fileno() > 2
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        sock.sendall(repr((address, sock.getsockname())).encode())

    with serving(reactor, TCP, handler) as served, connect(served) as client:
        assert read_to_eof(client) == repr((client.getsockname(), client.getpeername())).encode()


def test_haproxy_reports_the_real_client_before_any_payload(reactor: Any) -> None:
    def handler(sock: TransportSocket, address: SocketAddress) -> None:
        sock.sendall(b"welcome")  # the server speaks first
        assert sock.recv(10) == b"hi"
        sock.shutdown(socket.SHUT_WR)  # a PROXY wrapper passes the half-close through
        assert sock.recv(10) == b"bye"

    with serving(reactor, f"haproxy:{TCP}", handler) as served, connect(served) as client:
        client.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n")
        assert client.recv(10) == b"welcome"
        client.sendall(b"hi")
        assert client.recv(10) == b""
        client.sendall(b"bye")
        served.threads[0].join(WAIT)
        assert served.addresses == [("203.0.113.7", 5555)]
        assert served.sockets[0].family == socket.AF_INET


def test_unix_peer_address_matches_accept(reactor: Any, unix_path: str) -> None:
    with serving(reactor, f"unix:{quoteStringArgument(unix_path)}", echo) as served:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(WAIT)
            client.connect(unix_path)
            client.sendall(b"abc")
            assert client.recv(3) == b"abc"
            assert served.addresses == [""]
            assert served.sockets[0].family == socket.AF_UNIX
            assert served.sockets[0].getsockname() == unix_path
