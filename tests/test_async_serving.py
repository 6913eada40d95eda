"""``_async/serving.py``: a server with an async handler class serves on the reactor.

Every kind of address and endpoint, the socketserver hooks and their errors,
stopping, the limits, ``to_thread``, ``handle_request`` and datagrams, the
Twisted world, resources.  Differential where the stdlib has a counterpart:
the same client scenario against the stdlib's ``ThreadingTCPServer`` with a
synchronous handler and against our ``TCPServer`` with its async port (the
same code plus ``async`` and ``await``), same observable result.

Every test runs twice: connections read by the reactor, and through the
server's read multiplexer (``async_support.reads``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import socketserver
import threading
import time
from typing import Any

import pytest
from twisted.internet.defer import CancelledError

import txsocketserver
from async_handlers import AsyncEcho
from async_support import (
    RecordingServer,
    SyncEcho,
    echo_conversation,
    reads,  # noqa: F401 (an autouse fixture: both read modes)
    serving,
    stdlib_threading,
)
from support import (
    ANY_PORT,
    LOCALHOST,
    WAIT,
    connect,
    connect_to,
    fd_count,
    ipv6_loopback_available,
    recv_all,
    recv_line,
    request_reply,
    reset_close,
    serve_in_thread,
    settle_resources,
    thread_count,
    unix_socket_path,
    wait_until,
)


def test_echo_matches_the_stdlib_threading_server() -> None:
    with serving(stdlib_threading(SyncEcho)) as server:
        expected = echo_conversation(server)
    with serving(txsocketserver.TCPServer(ANY_PORT, AsyncEcho)) as server:
        assert echo_conversation(server) == expected
    assert expected[-1] == b"one\ntwo\npartial"


def _addresses() -> list[Any]:
    kinds: list[Any] = [
        pytest.param("tcp", id="tcp-address"),
        pytest.param("unix", id="unix-path"),
        pytest.param(f"tcp:0:interface={LOCALHOST}", id="tcp:"),
        pytest.param("unix:", id="unix:"),
        pytest.param(f"haproxy:tcp:0:interface={LOCALHOST}", id="haproxy:"),
    ]
    if ipv6_loopback_available():
        kinds.append(pytest.param("tcp6:0:interface=\\:\\:1", id="tcp6:"))
    return kinds


@pytest.mark.parametrize("kind", _addresses())
def test_echo_on_every_address_kind(kind: str) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "tcp":
            server = txsocketserver.TCPServer(ANY_PORT, AsyncEcho)
        elif kind == "unix":
            path = stack.enter_context(unix_socket_path())
            server = txsocketserver.UnixStreamServer(path, AsyncEcho)
        elif kind == "unix:":
            path = stack.enter_context(unix_socket_path())
            server = txsocketserver.UnixStreamServer(
                txsocketserver.Endpoint(f"unix:{path}"), AsyncEcho
            )
        else:
            server = txsocketserver.TCPServer(kind, AsyncEcho)
        stack.enter_context(serving(server))
        family = socket.AF_UNIX if kind.startswith("unix") else server.address_family
        with connect(server.server_address, family) as client:
            if kind.startswith("haproxy"):
                client.sendall(b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 443\r\n")
            client.sendall(b"hello\n")
            assert recv_line(client) == b"hello\n"
            client.sendall(b"bye\n")
            assert recv_line(client) == b"bye\n"


def test_tls_is_done_by_twisted_on_the_reactor(tls_cert: Any) -> None:
    import ssl

    from twisted.internet.endpoints import quoteStringArgument

    description = (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(tls_cert.key_path)}"
        f":certKey={quoteStringArgument(tls_cert.cert_path)}"
    )
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    server = txsocketserver.TCPServer(description, AsyncEcho)
    # Twisted's port, not a socket of ours: the TLS runs in the reactor.
    assert server.socket is None
    with serving(server):
        for _ in range(2):
            with (
                connect(server.server_address) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as client,
            ):
                client.sendall(b"secret\n" * 2000)
                received = b""
                while len(received) < 14000:
                    received += client.recv(65536)
                assert received == b"secret\n" * 2000


def test_an_endpoint_object_serves_too() -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    endpoint = txsocketserver.Endpoint(TCP4ServerEndpoint(reactor, 0, interface=LOCALHOST))
    with serving(txsocketserver.TCPServer(endpoint, AsyncEcho)) as server:
        assert request_reply(server, b"object\n") == b"object\n"


def refusing(base: type) -> type:
    class Refusing(base):  # type: ignore[misc, valid-type]
        def verify_request(self, request: Any, client_address: Any) -> bool:
            return client_address[1] % 2 == 0

    return Refusing


def test_verify_request_refuses_per_connection() -> None:
    def outcomes(server: Any) -> list[tuple[bool, bytes]]:
        results = []
        for _ in range(6):
            with connect_to(server) as client:
                client.sendall(b"ping\n")
                client.shutdown(socket.SHUT_WR)
                port = client.getsockname()[1]
                results.append((port % 2 == 0, recv_all(client)))
        return results

    class StdlibServer(refusing(socketserver.ThreadingTCPServer)):  # type: ignore[misc]
        daemon_threads = True

    with serving(StdlibServer(ANY_PORT, SyncEcho)) as server:
        expected = outcomes(server)
    with serving(refusing(txsocketserver.TCPServer)(ANY_PORT, AsyncEcho)) as server:
        ours = outcomes(server)
    for accepted, reply in expected + ours:
        assert reply == (b"ping\n" if accepted else b"")


class Failing(txsocketserver.AsyncStreamRequestHandler):
    finished: list[str] = []

    async def handle(self) -> None:
        line = await self.rfile.readline()
        if line.startswith(b"fail"):
            raise ValueError(line.strip().decode())
        self.wfile.write(line)

    async def finish(self) -> None:
        type(self).finished.append("finish")


def test_a_handler_error_reaches_handle_error_and_the_server_goes_on() -> None:
    Failing.finished = []
    server = RecordingServer(ANY_PORT, Failing)
    with serving(server):
        assert request_reply(server, b"fail now\n") == b""
        assert request_reply(server, b"fine\n") == b"fine\n"
    assert [repr(e) for e in server.errors] == ["ValueError('fail now')"]
    assert Failing.finished == ["finish", "finish"]


def test_handle_error_prints_the_traceback_as_the_stdlib_does(capfd: Any) -> None:
    with serving(txsocketserver.TCPServer(ANY_PORT, Failing)) as server:
        assert request_reply(server, b"fail loudly\n") == b""
    # The handler's connection is closed after handle_error() has printed.
    err = capfd.readouterr().err
    assert "Exception occurred during processing of request from" in err
    assert "ValueError: fail loudly" in err


class Lingering(txsocketserver.AsyncStreamRequestHandler):
    events: list[str] = []
    started = threading.Event()

    async def handle(self) -> None:
        type(self).started.set()
        try:
            await self.rfile.readline()
        except CancelledError:
            type(self).events.append("cancelled")
            raise

    async def finish(self) -> None:
        type(self).events.append("finish")


def test_server_close_cancels_running_handlers_and_finish_runs() -> None:
    Lingering.events = []
    Lingering.started = threading.Event()
    server = txsocketserver.TCPServer(ANY_PORT, Lingering)
    with server, serve_in_thread(server), connect_to(server) as client:
        assert Lingering.started.wait(WAIT)
        server.shutdown()
        server.server_close()
        assert Lingering.events == ["cancelled", "finish"]
        assert recv_all(client) == b""


def test_graceful_stop_lets_handlers_finish_then_cancels() -> None:
    from txsocketserver._twisted.service import stop_gracefully

    Lingering.events = []
    Lingering.started = threading.Event()
    server = txsocketserver.TCPServer(ANY_PORT, Lingering)
    with serve_in_thread(server) as serving_thread:
        with connect_to(server) as quick:
            quick.sendall(b"done\n")
            assert wait_until(lambda: Lingering.events == ["finish"])
        Lingering.started.clear()
        with connect_to(server) as slow:
            assert Lingering.started.wait(WAIT)
            started = time.monotonic()
            drained = stop_gracefully(server, drain_timeout=0.3, serving=serving_thread.thread)
            assert not drained
            assert time.monotonic() - started >= 0.3
            assert Lingering.events == ["finish", "cancelled", "finish"]
            assert recv_all(slow) == b""


def test_max_connections_makes_the_next_client_wait_then_serves_it() -> None:
    class Capped(txsocketserver.TCPServer):
        max_connections = 1

    with serving(Capped(ANY_PORT, AsyncEcho)) as server:
        with connect_to(server) as first:
            first.sendall(b"one\n")
            assert recv_line(first) == b"one\n"
            second = connect_to(server)  # completes in the kernel's backlog
            with second:
                second.sendall(b"two\n")
                second.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    second.recv(10)
                first.close()
                second.settimeout(WAIT)
                assert recv_line(second) == b"two\n"


def test_idle_timeout_closes_a_quiet_connection_and_logs(caplog: Any) -> None:
    class Idle(txsocketserver.TCPServer):
        idle_timeout = 0.3

    with serving(Idle(ANY_PORT, AsyncEcho)) as server, connect_to(server) as client:
        with caplog.at_level(logging.WARNING, logger="txsocketserver"):
            for _ in range(4):  # activity keeps it open past the timeout
                client.sendall(b"tick\n")
                assert recv_line(client) == b"tick\n"
                last_activity = time.monotonic()
                time.sleep(0.15)
            assert "idle_timeout" not in caplog.text
            assert client.recv(10) == b""
            assert 0.25 < time.monotonic() - last_activity < WAIT
        assert "idle_timeout" in caplog.text


class Offloading(txsocketserver.AsyncStreamRequestHandler):
    running = 0
    peak = 0
    lock = threading.Lock()

    @classmethod
    def work(cls) -> str:
        with cls.lock:
            cls.running += 1
            cls.peak = max(cls.peak, cls.running)
        time.sleep(0.1)
        with cls.lock:
            cls.running -= 1
        return threading.current_thread().name

    async def handle(self) -> None:
        await self.rfile.readline()
        name = await self.server.to_thread(self.work)
        self.wfile.write(name.encode() + b"\n")


def test_to_thread_runs_on_a_pool_of_its_own_bounded_by_max_threads() -> None:
    class Server(txsocketserver.TCPServer):
        max_threads = 2

    Offloading.peak = 0
    with serving(Server(ANY_PORT, Offloading)) as server:
        clients = [connect_to(server) for _ in range(5)]
        for client in clients:
            client.sendall(b"work\n")
        names = {recv_line(client) for client in clients}
        for client in clients:
            client.close()
    assert Offloading.peak == 2
    assert all(b"Server-to_thread" in name for name in names), names


def test_handle_request_takes_one_connection_and_handle_timeout_fires() -> None:
    class Server(txsocketserver.TCPServer):
        timeouts = 0
        timeout = 0.1

        def handle_timeout(self) -> None:
            self.timeouts += 1

    with Server(ANY_PORT, AsyncEcho) as server:
        server.handle_request()
        assert server.timeouts == 1
        with connect_to(server) as first, connect_to(server) as second:
            first.sendall(b"first\n")
            second.sendall(b"second\n")
            server.handle_request()
            assert recv_line(first) == b"first\n"
            second.settimeout(0.2)
            with pytest.raises(TimeoutError):
                second.recv(10)  # still in the backlog
            second.settimeout(WAIT)
            server.handle_request()
            assert recv_line(second) == b"second\n"


class AsyncDatagramUpper(txsocketserver.AsyncDatagramRequestHandler):
    async def handle(self) -> None:
        line = await self.rfile.readline()
        self.wfile.write(line.upper() + await self.rfile.read())
        await self.wfile.drain()


class SyncDatagramUpper(socketserver.DatagramRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        self.wfile.write(line.upper() + self.rfile.read())


@pytest.mark.parametrize("family", ["udp", "unix"])
def test_datagram_echo_matches_the_stdlib(family: str) -> None:
    def exchange(server: Any, client_path: str | None) -> list[bytes]:
        kind = socket.AF_INET if family == "udp" else socket.AF_UNIX
        with socket.socket(kind, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            if client_path:
                client.bind(client_path)
            replies = []
            for payload in (b"abc\ndef", b"", b"x" * 1000):
                client.sendto(payload, server.server_address)
                replies.append(client.recv(65536))
            return replies

    results = []
    for module, handler in (
        (socketserver, SyncDatagramUpper),
        (txsocketserver, AsyncDatagramUpper),
    ):
        with contextlib.ExitStack() as stack:
            if family == "udp":
                server = module.UDPServer(ANY_PORT, handler)
                client_path = None
            else:
                server = module.UnixDatagramServer(
                    stack.enter_context(unix_socket_path()), handler
                )
                client_path = stack.enter_context(unix_socket_path())
            stack.enter_context(serving(server))
            results.append(exchange(server, client_path))
    assert results[0] == results[1] == [b"ABC\ndef", b"", b"X" * 1000]


def test_start_server_and_service_stop() -> None:
    from twisted.internet import defer

    from txsocketserver._twisted import reactor as _reactor

    server = txsocketserver.TCPServer(ANY_PORT, AsyncEcho)
    service = _reactor.call_in_reactor(lambda: txsocketserver.start_server(server))
    assert request_reply(server, b"twisted world\n") == b"twisted world\n"
    _reactor.call_in_reactor(lambda: defer.maybeDeferred(service.stopService))
    with pytest.raises(OSError):
        connect_to(server, timeout=1)


def test_fds_and_threads_back_at_baseline_after_10000_connections_with_resets() -> None:
    server = txsocketserver.TCPServer(ANY_PORT, AsyncEcho)
    server.request_queue_size = 128
    with server, serve_in_thread(server):
        assert request_reply(server, b"warm\n") == b"warm\n"
        gc.collect()
        baseline_fds, baseline_threads = fd_count(), thread_count()
        for n in range(10000):
            client = connect_to(server)
            if n % 3 == 0:
                client.sendall(b"then reset\n")
                reset_close(client)
            elif n % 3 == 1:
                reset_close(client)
            else:
                client.sendall(b"echo\n")
                assert recv_line(client) == b"echo\n"
                client.close()
        assert wait_until(lambda: not server._serving.connections, timeout=2 * WAIT)
        settle_resources(baseline_fds, baseline_threads)
        assert request_reply(server, b"after\n") == b"after\n"
