"""Servers as Twisted services: start, serve, log errors, drain gracefully, stop.

The reactor here is the one txsocketserver runs in a background thread; the
service calls are made on that reactor thread, as in ``twistd``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

import txsocketserver
from support import ANY_PORT, LOCALHOST, WAIT, connect, recv_all, recv_line, wait_until
from twisted_world_handlers import (
    BlockingReadHandler,
    EchoHandler,
    FailingHandler,
    GateHandler,
    make_gate_server,
)
from txsocketserver._twisted import reactor as _reactor

ADDRESSES = {"socket": ANY_PORT, "endpoint": f"tcp:0:interface={LOCALHOST}"}


def on_reactor(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``function(*args, **kwargs)`` on the reactor thread; wait for its
    Deferred's result."""
    return _reactor.call_in_reactor(lambda: function(*args, **kwargs))


def deferred_on_reactor(function: Any, *args: Any) -> Deferred[Any]:
    """Call ``function(*args)`` on the reactor thread; return its Deferred unresolved."""
    # Boxed, because call_in_reactor waits for a Deferred it is handed back.
    return _reactor.call_in_reactor(lambda: [function(*args)])[0]


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def address_of(server: Any) -> tuple[str, int]:
    return server.server_address[:2]


@pytest.mark.parametrize("mode", ["socket", "endpoint"])
def test_service_serves_and_stops(mode: str) -> None:
    server = txsocketserver.ThreadingTCPServer(ADDRESSES[mode], EchoHandler)
    service = on_reactor(txsocketserver.start_server, server)
    assert service.running and service.server is server
    with connect(address_of(server)) as client:
        client.sendall(b"hello\n")
        assert recv_line(client) == b"hello\n"
    on_reactor(service.stopService)
    assert not service.running
    with pytest.raises(ConnectionRefusedError):
        connect(address_of(server)).close()


def test_handler_errors_go_to_twisted_logger(
    log_events: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    server = txsocketserver.TCPServer(ANY_PORT, FailingHandler)
    service = on_reactor(txsocketserver.start_server, server)
    try:
        with connect(address_of(server)) as client:
            assert recv_all(client) == b""
        assert wait_until(lambda: any("log_failure" in event for event in log_events))
    finally:
        on_reactor(service.stopService)
    failure = next(event["log_failure"] for event in log_events if "log_failure" in event)
    assert failure.check(ValueError)
    assert "Exception occurred" not in capsys.readouterr().err
    # Back in the blocking world, handle_error prints again.
    assert server._BaseServer__error_log is None


@pytest.mark.parametrize("mode", ["socket", "endpoint"])
@pytest.mark.parametrize(
    "server_class", [txsocketserver.TCPServer, txsocketserver.ThreadingTCPServer]
)
def test_stop_drains_request_in_flight(mode: str, server_class: type) -> None:
    server: Any = make_gate_server(server_class, ADDRESSES[mode], GateHandler)
    address = address_of(server)
    # The stop's first step is shutdown(): seen here, on the instance.
    stop_begun = threading.Event()
    shutdown = server.shutdown
    server.shutdown = lambda: (stop_begun.set(), shutdown())[1]
    service = on_reactor(txsocketserver.start_server, server, drain_timeout=WAIT)
    with connect(address) as client:
        client.sendall(b"go\n")
        assert server.started.wait(WAIT)
        stopped = deferred_on_reactor(service.stopService)
        assert stop_begun.wait(WAIT)
        assert not stopped.called  # the request in flight holds the stop
        # No new request is served once the stop began: the connection is
        # refused (the port is closed, or closes while the handshake is in
        # the kernel: a reset) or waits in the backlog until closed.
        try:
            late: socket.socket | None = connect(address, timeout=1.0)
        except (ConnectionRefusedError, ConnectionResetError):
            late = None
        server.release.set()
        assert recv_all(client) == b"done\n"
    assert wait_until(lambda: stopped.called)
    if late is not None:
        with late:
            try:
                late.sendall(b"late\n")
                assert recv_all(late) == b""
            except (ConnectionResetError, BrokenPipeError):
                pass
    assert server.outcomes == ["done"]


@pytest.mark.parametrize("mode", ["socket", "endpoint"])
@pytest.mark.parametrize(
    "server_class", [txsocketserver.TCPServer, txsocketserver.ThreadingTCPServer]
)
def test_straggler_closed_after_drain_timeout(mode: str, server_class: type) -> None:
    server: Any = make_gate_server(server_class, ADDRESSES[mode], BlockingReadHandler)
    service = on_reactor(txsocketserver.start_server, server, drain_timeout=0.3)
    with connect(address_of(server)) as client:
        client.sendall(b"first line\n")
        assert server.started.wait(WAIT)
        began = time.monotonic()
        on_reactor(service.stopService)
        took = time.monotonic() - began
        assert 0.3 <= took < 3.0
        # The handler saw end of stream and ended; the client sees the close.
        assert server.outcomes == ["eof"]
        assert recv_all(client) == b""


class StdlibStyleThreadingServer(txsocketserver.ThreadingTCPServer):
    """Overrides the public hook with a whole body of its own, no super()."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def test_stop_does_not_wait_for_finished_requests_of_an_overridden_hook() -> None:
    # The in-flight record must end outside process_request_thread(), or this
    # override would leave its finished request "in flight" for drain_timeout.
    server = StdlibStyleThreadingServer(ANY_PORT, EchoHandler)
    service = on_reactor(txsocketserver.start_server, server, drain_timeout=20.0)
    with connect(address_of(server)) as client:
        client.sendall(b"one\n")
        assert recv_line(client) == b"one\n"
    assert wait_until(lambda: not server._requests_in_flight())
    began = time.monotonic()
    on_reactor(service.stopService)
    assert time.monotonic() - began < 3.0


def test_start_server_listens_on_unbound_endpoint_server() -> None:
    server = txsocketserver.ThreadingTCPServer(
        f"tcp:0:interface={LOCALHOST}", EchoHandler, bind_and_activate=False
    )
    service = on_reactor(txsocketserver.start_server, server)
    try:
        assert server.server_address[1] != 0
        with connect(address_of(server)) as client:
            client.sendall(b"late bind\n")
            assert recv_line(client) == b"late bind\n"
    finally:
        on_reactor(service.stopService)


def test_start_server_fails_when_endpoint_cannot_listen() -> None:
    with socket.socket() as taken:
        taken.bind(ANY_PORT)
        taken.listen()
        port = taken.getsockname()[1]
        server = txsocketserver.TCPServer(
            f"tcp:{port}:interface={LOCALHOST}", EchoHandler, bind_and_activate=False
        )
        with pytest.raises(Exception, match="[Aa]ddress already in use|Couldn't listen"):
            on_reactor(txsocketserver.start_server, server)


def test_service_runs_once() -> None:
    server = txsocketserver.TCPServer(ANY_PORT, EchoHandler)
    service = txsocketserver.ServerService(server)
    on_reactor(lambda: service._start())
    on_reactor(service.stopService)
    with pytest.raises(RuntimeError, match="runs once"):
        on_reactor(service.startService)


def test_datagram_server_as_service() -> None:
    class Reply(txsocketserver.DatagramRequestHandler):
        def handle(self) -> None:
            self.wfile.write(b"got " + self.rfile.read())

    server = txsocketserver.ThreadingUDPServer(ANY_PORT, Reply)
    service = on_reactor(txsocketserver.start_server, server)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.sendto(b"ping", server.server_address)
            assert client.recvfrom(100)[0] == b"got ping"
    finally:
        on_reactor(service.stopService)


def test_blocking_calls_refused_on_reactor_thread() -> None:
    server = txsocketserver.TCPServer(ANY_PORT, EchoHandler)
    try:
        with pytest.raises(RuntimeError, match="ServerService"):
            on_reactor(server.serve_forever)
    finally:
        server.server_close()


def test_a_client_gone_mid_request_is_one_line_in_the_twisted_world(
    events: list[dict[str, Any]],
) -> None:
    # Ours only (the stdlib prints a traceback): under a service, the CLI or
    # twistd, a reset while the handler writes is logged without a traceback.
    from twisted_world_handlers import FirehoseHandler

    server = txsocketserver.ThreadingTCPServer(ANY_PORT, FirehoseHandler)
    service = on_reactor(txsocketserver.start_server, server, drain_timeout=WAIT)
    with connect(address_of(server)) as client:
        client.sendall(b"100000000\n")
        assert client.recv(1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_until(lambda: any("went away" in formatEvent(e) for e in events))
    deferred = deferred_on_reactor(service.stopService)
    assert wait_until(lambda: deferred.called)
    assert not [event for event in events if "log_failure" in event]


def test_a_stop_serves_the_connections_an_endpoint_accepted_before_it() -> None:
    # Behind haproxy: Twisted accepts; a busy synchronous server's next
    # connections wait in the listener's queue, and one is still sending its
    # PROXY header when the stop begins.  A reload of --workers stops its old
    # workers this way while clients arrive: each of them must be served.
    from txsocketserver._twisted.service import stop_gracefully

    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\n"
    release = threading.Event()
    first_started = threading.Event()

    class Echo(txsocketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if line == b"first\n":
                first_started.set()
                assert release.wait(WAIT)
            self.wfile.write(line)

    server = txsocketserver.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", Echo)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    listener = server._listener  # type: ignore[attr-defined]
    address = (LOCALHOST, server.server_address[1])
    clients = [connect(address) for _ in range(4)]
    stopper: threading.Thread | None = None
    try:
        clients[0].sendall(header + b"first\n")
        assert first_started.wait(WAIT)
        for client, line in zip(clients[1:3], (b"second\n", b"third\n"), strict=True):
            client.sendall(header + line)
        clients[3].sendall(header[:10])  # in its header stage
        assert wait_until(lambda: len(listener._queue) == 2 and len(listener._pending) == 1)
        port = listener._port
        result: list[bool] = []
        stopper = threading.Thread(
            target=lambda: result.append(
                stop_gracefully(server, drain_timeout=WAIT, serving=serving)
            )
        )
        stopper.start()
        assert wait_until(lambda: not port.connected)  # the port has closed
        with pytest.raises(OSError):
            connect(address, timeout=1).close()
        clients[3].sendall(header[10:] + b"fourth\n")
        release.set()
        replies = [recv_line(client) for client in clients]
        assert replies == [b"first\n", b"second\n", b"third\n", b"fourth\n"]
        stopper.join(WAIT)
        assert not stopper.is_alive() and result == [True]
    finally:
        release.set()
        for client in clients:
            client.close()
        if stopper is not None:
            stopper.join(WAIT)
        serving.join(WAIT)
        server.server_close()
