"""The request lifecycle seam (``_core/lifecycle.py``): what an observer sees, per kind of server.

Each test attaches a recording observer to a real server, drives real
clients through it, and checks each connection's exact sequence of events
and its outcome, addresses and byte counts.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from support import (
    LOCALHOST,
    WAIT,
    SelfSignedCert,
    connect_to,
    recv_all,
    serve_in_thread,
    wait_until,
)
from txsocketserver._core import lifecycle

ANY_PORT = (LOCALHOST, 0)
OK = ["accepted", "started", "ended"]
REFUSED_BEFORE_START = ["accepted", "refused", "ended"]
REFUSED_AFTER_START = ["accepted", "started", "refused", "ended"]


class Recorder(txsocketserver.LifecycleObserver):
    """Records every event with its record; waits for a number of ends."""

    def __init__(self) -> None:
        self.events: list[tuple[str, lifecycle.ConnectionRecord]] = []
        self.threads: dict[str, set[str]] = {}
        self._changed = threading.Condition()

    def _add(self, event: str, record: lifecycle.ConnectionRecord) -> None:
        with self._changed:
            self.events.append((event, record))
            self.threads.setdefault(event, set()).add(threading.current_thread().name)
            self._changed.notify_all()

    def accepted(self, record: lifecycle.ConnectionRecord) -> None:
        self._add("accepted", record)

    def refused(self, record: lifecycle.ConnectionRecord) -> None:
        assert record.outcome.startswith("refused:")
        self._add("refused", record)

    def started(self, record: lifecycle.ConnectionRecord) -> None:
        self._add("started", record)

    def ended(self, record: lifecycle.ConnectionRecord) -> None:
        assert record.ended is not None
        self._add("ended", record)

    def records(self, ended: int) -> list[lifecycle.ConnectionRecord]:
        """The records, in order of acceptance, once *ended* of them have ended."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: sum(event == "ended" for event, _ in self.events) >= ended, WAIT
            ), self.events
            seen: list[lifecycle.ConnectionRecord] = []
            for _, record in self.events:
                if record not in seen:
                    seen.append(record)
            return seen

    def sequence(self, record: lifecycle.ConnectionRecord) -> list[str]:
        with self._changed:
            return [event for event, seen in self.events if seen is record]


# -- handlers ------------------------------------------------------------------------


class LineEcho(txsocketserver.StreamRequestHandler):
    """Echoes one line; ``boom`` raises."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if line == b"boom\n":
            raise ValueError("boom")
        self.wfile.write(line)


class AsyncLineEcho(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        line = await self.rfile.readline()
        if line == b"boom\n":
            raise ValueError("boom")
        self.wfile.write(line)


class DatagramEcho(txsocketserver.DatagramRequestHandler):
    def handle(self) -> None:
        data = self.rfile.read()
        if data == b"boom":
            raise ValueError("boom")
        self.wfile.write(data)


class AsyncDatagramEcho(txsocketserver.AsyncDatagramRequestHandler):
    async def handle(self) -> None:
        data = await self.rfile.read()
        if data == b"boom":
            raise ValueError("boom")
        self.wfile.write(data)


class Quiet:
    """Refuses the second request; records handle_error instead of printing."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified = getattr(self, "verified", 0) + 1
        return self.verified != 2

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class QuietTCP(Quiet, txsocketserver.TCPServer):
    pass


class QuietThreadingTCP(Quiet, txsocketserver.ThreadingTCPServer):
    pass


class QuietForkingTCP(Quiet, txsocketserver.ForkingTCPServer):
    pass


class QuietServerForkingTCP(QuietForkingTCP):
    fork_from = "server"


class QuietUDP(Quiet, txsocketserver.UDPServer):
    pass


class QuietThreadingUDP(Quiet, txsocketserver.ThreadingUDPServer):
    pass


STREAM_KINDS = {
    "sync": (QuietTCP, LineEcho, ANY_PORT),
    "threading": (QuietThreadingTCP, LineEcho, ANY_PORT),
    "forking": (QuietForkingTCP, LineEcho, ANY_PORT),
    "forking from the server": (QuietServerForkingTCP, LineEcho, ANY_PORT),
    "async": (QuietTCP, AsyncLineEcho, ANY_PORT),
    "sync tcp: description": (QuietTCP, LineEcho, f"tcp:0:interface={LOCALHOST}"),
    "threading systemd-like endpoint (Twisted accepts)": (
        QuietThreadingTCP,
        LineEcho,
        f"haproxy:tcp:0:interface={LOCALHOST}",
    ),
}


def exchange(server: Any, payload: bytes, header: bytes = b"") -> bytes:
    """Send, half-close, read to the end; b"" if the server closed first."""
    with connect_to(server) as client:
        try:
            client.sendall(header + payload)
            client.shutdown(socket.SHUT_WR)
            return recv_all(client)
        except (BrokenPipeError, ConnectionResetError, OSError):
            return b""


def proxy_v1(source: tuple[str, int] = ("10.1.2.3", 5555)) -> bytes:
    return f"PROXY TCP4 {source[0]} 127.0.0.1 {source[1]} 80\r\n".encode()


@pytest.mark.parametrize("kind", list(STREAM_KINDS))
def test_a_stream_servers_connections_are_accepted_started_and_ended_once(kind: str) -> None:
    server_class, handler, address = STREAM_KINDS[kind]
    proxied = isinstance(address, str) and address.startswith("haproxy:")
    header = proxy_v1() if proxied else b""
    recorder = Recorder()
    with server_class(address, handler) as server:
        server.add_observer(recorder)
        with serve_in_thread(server):
            assert exchange(server, b"hello\n", header) == b"hello\n"
            assert exchange(server, b"refused\n", header) == b""
            assert exchange(server, b"boom\n", header) == b""
            ok, refused, failed = recorder.records(ended=3)
    assert recorder.sequence(ok) == OK
    assert recorder.sequence(refused) == REFUSED_BEFORE_START
    assert recorder.sequence(failed) == OK
    assert (ok.outcome, refused.outcome, failed.outcome) == (
        "ok",
        "refused:verify_request",
        "error",
    )
    for record in (ok, refused, failed):
        assert record.server is server
        assert record.peer[0] == LOCALHOST
        assert record.client_address == (("10.1.2.3", 5555) if proxied else record.peer)
        assert record.accepted_at > 0
    assert ok.started is not None and ok.ended is not None and ok.ended >= ok.started
    assert refused.started is None
    if kind == "async" or proxied:
        # The server sees the bytes: through its protocol (async), through
        # the socket facade, as the handler reads and writes them (endpoints).
        assert (ok.bytes_received, ok.bytes_sent) == (6, 6)
        assert (failed.bytes_received, failed.bytes_sent) == (5, 0)
    else:
        # The handler has the real socket: the server sees no bytes.
        assert (ok.bytes_received, ok.bytes_sent) == (None, None)
    if kind.startswith("forking"):
        assert ok.details == {"exit_code": 0}
        assert failed.details == {"exit_code": 1}
    if proxied:
        assert ok.details == {
            "proxy": {"source": ("10.1.2.3", 5555), "destination": ("127.0.0.1", 80)}
        }


def test_each_step_is_told_on_the_thread_it_happens_on() -> None:
    recorder = Recorder()
    with QuietThreadingTCP(ANY_PORT, LineEcho) as server:
        server.add_observer(recorder)
        with serve_in_thread(server):
            assert exchange(server, b"hello\n") == b"hello\n"
            recorder.records(ended=1)
    assert recorder.threads["accepted"] == recorder.threads["started"] == {"serve_forever"}
    assert recorder.threads["ended"] != {"serve_forever"}  # a pool thread


@pytest.mark.parametrize(
    "server_class, handler",
    [
        (QuietUDP, DatagramEcho),
        (QuietThreadingUDP, DatagramEcho),
        (QuietUDP, AsyncDatagramEcho),
    ],
    ids=["sync", "threading", "async"],
)
def test_a_datagram_is_a_record(server_class: Any, handler: Any) -> None:
    recorder = Recorder()
    with server_class(ANY_PORT, handler) as server:
        server.add_observer(recorder)
        with serve_in_thread(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(WAIT)
            client.bind(ANY_PORT)
            client.sendto(b"hello", server.server_address)
            assert client.recv(100) == b"hello"
            client.sendto(b"refused", server.server_address)
            recorder.records(ended=2)
            client.sendto(b"boom", server.server_address)
            ok, refused, failed = recorder.records(ended=3)
            client_address = client.getsockname()
    assert [recorder.sequence(r) for r in (ok, refused, failed)] == [
        OK,
        REFUSED_BEFORE_START,
        OK,
    ]
    assert [r.outcome for r in (ok, refused, failed)] == ["ok", "refused:verify_request", "error"]
    assert ok.client_address == client_address == ok.peer
    assert [r.bytes_received for r in (ok, refused, failed)] == [5, 7, 4]
    assert ok.bytes_sent is None  # the handler replies through the socket itself


# -- the PROXY header stage ------------------------------------------------------------


@pytest.mark.parametrize("handler", [LineEcho, AsyncLineEcho], ids=["threading", "async"])
@pytest.mark.parametrize(
    "trusted, data, reason",
    [
        (("127.0.0.1",), b"GET / HTTP/1.0\r\n\r\n", "proxy_header"),
        (("127.0.0.1",), b"PROXY TCP4 10.1", "proxy_header"),
        (("192.0.2.1",), proxy_v1() + b"hello\n", "untrusted_proxy"),
    ],
    ids=["bad header", "cut header", "untrusted peer"],
)
def test_a_connection_refused_in_its_header_stage_never_starts(
    handler: Any, trusted: tuple[str, ...], data: bytes, reason: str
) -> None:
    server_class = QuietThreadingTCP if handler is LineEcho else QuietTCP
    recorder = Recorder()
    with server_class(f"haproxy:tcp:0:interface={LOCALHOST}", handler) as server:
        server.trusted_proxies = trusted
        server.add_observer(recorder)
        with serve_in_thread(server):
            assert exchange(server, data) == b""
            (record,) = recorder.records(ended=1)
    assert recorder.sequence(record) == REFUSED_BEFORE_START
    assert record.outcome == f"refused:{reason}"
    assert record.client_address is None
    assert record.peer[0] == LOCALHOST
    assert record.started is None


def test_a_late_header_is_refused() -> None:
    recorder = Recorder()
    with QuietThreadingTCP(f"haproxy:tcp:0:interface={LOCALHOST}", LineEcho) as server:
        server.header_timeout = 0.2
        server.add_observer(recorder)
        with serve_in_thread(server), connect_to(server) as client:
            assert recv_all(client) == b""  # closed by the server at the deadline
            (record,) = recorder.records(ended=1)
    assert (recorder.sequence(record), record.outcome) == (
        REFUSED_BEFORE_START,
        "refused:proxy_header",
    )


# -- TLS -------------------------------------------------------------------------------


def tls_description(cert: SelfSignedCert) -> str:
    return (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}"
    )


@pytest.mark.parametrize("handler", [LineEcho, AsyncLineEcho], ids=["sync", "async"])
def test_a_failed_tls_handshake_is_a_refusal(tls_cert: SelfSignedCert, handler: Any) -> None:
    import ssl

    recorder = Recorder()
    server_class = QuietThreadingTCP if handler is LineEcho else QuietTCP
    with server_class(tls_description(tls_cert), handler) as server:
        server.verified = 5  # no verify_request refusal
        server.add_observer(recorder)
        with serve_in_thread(server):
            # Not TLS at all: the handshake fails.
            assert exchange(server, b"GET / HTTP/1.0\r\n\r\n") == b""
            with (
                connect_to(server) as raw,
                ssl.create_default_context(cafile=tls_cert.cert_path).wrap_socket(
                    raw, server_hostname=LOCALHOST
                ) as client,
            ):
                client.sendall(b"hello\n")
                assert client.recv(100) == b"hello\n"
            failed, ok = recorder.records(ended=2)
    # A blocking handler's handshake runs in the request's own step, after
    # ``started``; an async connection's runs in its stage, before the
    # handler is made (as a PROXY header's does).
    expected = REFUSED_AFTER_START if handler is LineEcho else REFUSED_BEFORE_START
    assert recorder.sequence(failed) == expected
    assert failed.outcome == "refused:tls_handshake"
    assert recorder.sequence(ok) == OK
    assert ok.outcome == "ok"


# -- observers -------------------------------------------------------------------------


class Raising(txsocketserver.LifecycleObserver):
    def accepted(self, record: lifecycle.ConnectionRecord) -> None:
        raise RuntimeError("observer bug")


def test_an_observer_that_raises_is_logged_once_and_serving_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()
    with QuietTCP(ANY_PORT, LineEcho) as server:
        server.verified = 5  # no refusal
        raising = Raising()
        server.add_observer(raising)
        server.add_observer(recorder)
        with serve_in_thread(server), caplog.at_level(logging.WARNING, "txsocketserver"):
            for _ in range(3):
                assert exchange(server, b"hello\n") == b"hello\n"
            records = recorder.records(ended=3)
        server.remove_observer(raising)
        with pytest.raises(ValueError):
            server.remove_observer(raising)
    assert [recorder.sequence(r) for r in records] == [OK] * 3
    logged = [r for r in caplog.records if "observer" in r.getMessage()]
    assert len(logged) == 1
    assert "RuntimeError: observer bug" in logged[0].exc_text  # type: ignore[operator]


def test_a_removed_observer_hears_nothing_more() -> None:
    recorder = Recorder()
    with QuietTCP(ANY_PORT, LineEcho) as server:
        server.verified = 5
        server.add_observer(recorder)
        with serve_in_thread(server):
            assert exchange(server, b"one\n") == b"one\n"
            recorder.records(ended=1)
            server.remove_observer(recorder)
            assert exchange(server, b"two\n") == b"two\n"
    assert len(recorder.events) == 3


def test_without_observers_no_record_is_made() -> None:
    with QuietTCP(ANY_PORT, LineEcho) as server:
        assert server._observers == ()
        assert lifecycle.accepted(server, None) is None


# -- gauges ----------------------------------------------------------------------------


class Parked(txsocketserver.StreamRequestHandler):
    """Holds its request until the test releases it."""

    inside = threading.Semaphore(0)
    release = threading.Event()

    def handle(self) -> None:
        Parked.inside.release()
        Parked.release.wait(WAIT)


def test_the_gauges_count_requests_and_pool_threads() -> None:
    Parked.release.clear()
    with txsocketserver.ThreadingTCPServer(ANY_PORT, Parked) as server:
        server.max_threads = 1
        assert server.requests_in_flight == 0
        assert server.pool_threads() == (0, 0, 0)
        with serve_in_thread(server), connect_to(server), connect_to(server):
            assert Parked.inside.acquire(timeout=WAIT)
            assert wait_until(lambda: server.requests_in_flight == 2)
            # One runs, one waits for the only thread (once handed to the pool:
            # it is in flight from verify_request on).
            assert wait_until(lambda: server.pool_threads() == (1, 0, 1))
            Parked.release.set()
            assert wait_until(lambda: server.requests_in_flight == 0)
        assert Parked.inside.acquire(timeout=WAIT)


# -- accept() out of resources -----------------------------------------------------------


class OutOfFds(QuietTCP):
    """Its first ``get_request()`` calls fail as ``accept()`` does without fds."""

    failures_left = 3

    def get_request(self) -> tuple[Any, Any]:
        if self.failures_left:
            self.failures_left -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().get_request()


@pytest.mark.parametrize("handler", [LineEcho, AsyncLineEcho], ids=["sync", "async"])
def test_accept_out_of_fds_is_logged_once_per_episode_with_its_count(
    handler: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with OutOfFds(ANY_PORT, handler) as server:
        server.verified = 5
        with serve_in_thread(server), caplog.at_level(logging.WARNING, "txsocketserver"):
            assert exchange(server, b"hello\n") == b"hello\n"
            server.failures_left = 2  # a second episode
            assert exchange(server, b"again\n") == b"again\n"
    logged = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
    assert len(logged) == 4, logged
    assert "cannot accept: [Errno 24] Too many open files" in logged[0]
    assert "accepts again, after 3 failed attempts" in logged[1]
    assert "cannot accept" in logged[2]
    assert "accepts again, after 2 failed attempts" in logged[3]


# -- timeouts and resets -------------------------------------------------------------------


@pytest.mark.parametrize("handler", [LineEcho, AsyncLineEcho], ids=["sync", "async"])
def test_a_quiet_connection_ends_as_a_timeout(handler: Any) -> None:
    recorder = Recorder()
    with QuietTCP(ANY_PORT, handler) as server:
        server.verified = 5
        server.idle_timeout = 0.2
        server.add_observer(recorder)
        with serve_in_thread(server), connect_to(server) as client:
            (record,) = recorder.records(ended=1)  # the server gave up waiting
            assert recv_all(client) == b""
    assert (recorder.sequence(record), record.outcome) == (OK, "timeout")


@pytest.mark.parametrize("handler", [LineEcho, AsyncLineEcho], ids=["sync", "async"])
def test_a_client_that_resets_mid_request_ends_as_a_reset(handler: Any) -> None:
    from support import reset_close

    recorder = Recorder()
    with QuietTCP(ANY_PORT, handler) as server:
        server.verified = 5
        server.add_observer(recorder)
        with serve_in_thread(server):
            client = connect_to(server)
            client.sendall(b"no end of line")
            reset_close(client)
            (record,) = recorder.records(ended=1)
    assert (recorder.sequence(record), record.outcome) == (OK, "reset")
