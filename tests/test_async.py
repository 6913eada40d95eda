"""Async handlers (``async def handle``) on the reactor, on real sockets with real clients.

Differential where the stdlib has a counterpart: the same client scenario
against the stdlib's ``ThreadingTCPServer`` with a synchronous handler and
against our ``TCPServer`` with its async port (the same code plus ``async``
and ``await``), same observable result.  Tests of what only async handlers
have (drain, cancellation, the reactor-side limits) say so.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError

import txsocketserver
from async_handlers import AsyncAddress, AsyncEcho
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

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture(autouse=True, params=["reactor", "multiplexed"])
def reads(request: Any, monkeypatch: Any) -> str:
    """Every test twice: every accepted connection read by the reactor itself
    (as a lone connection is), and every one through the server's
    ReadMultiplexer (as while others are open)."""
    at = 0 if request.param == "multiplexed" else 1 << 30
    monkeypatch.setattr("txsocketserver._async.serving.MULTIPLEX_AT", at)
    return str(request.param)


class SyncEcho(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(line)


@contextlib.contextmanager
def serving(server: Any) -> Iterator[Any]:
    with server, serve_in_thread(server):
        yield server


def stdlib_threading(handler: type, address: Any = ANY_PORT) -> Any:
    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True

    return Server(address, handler)


def echo_conversation(server: Any) -> list[bytes]:
    """Two clients at once, interleaved lines, then one that half-closes."""
    replies = []
    with connect_to(server) as first, connect_to(server) as second:
        for n in range(3):
            for client in (first, second):
                client.sendall(b"line %d from %d\n" % (n, client.fileno()))
                replies.append(recv_line(client).split(b" from ")[0])
    replies.append(request_reply(server, b"one\ntwo\npartial"))
    return replies


# -- echo over every kind of address ------------------------------------------------------


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


def test_haproxy_gives_the_real_client_address() -> None:
    server = txsocketserver.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", AsyncAddress)
    with serving(server), connect(server.server_address) as client:
        client.sendall(b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 443\r\n")
        reply = json.loads(recv_line(client))
    assert reply["client"] == ["198.51.100.7", 40123]
    assert reply["server"] == ["203.0.113.1", 443]


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


# -- the reader: io semantics -------------------------------------------------------------

LONG_LINE = b"x" * 70000 + b"\n"


class SyncLineSizes(socketserver.StreamRequestHandler):
    """What http.server does: readline(65537) until a blank line."""

    def handle(self) -> None:
        sizes = []
        while True:
            line = self.rfile.readline(65537)
            sizes.append(len(line))
            if line in (b"\r\n", b"\n", b""):
                break
        sizes.append(len(self.rfile.read(5)))
        sizes.append(len(self.rfile.read()))
        self.wfile.write(json.dumps(sizes).encode())


class AsyncLineSizes(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        sizes = []
        while True:
            line = await self.rfile.readline(65537)
            sizes.append(len(line))
            if line in (b"\r\n", b"\n", b""):
                break
        sizes.append(len(await self.rfile.read(5)))
        sizes.append(len(await self.rfile.read()))
        self.wfile.write(json.dumps(sizes).encode())


def test_readline_size_and_read_follow_io_semantics() -> None:
    request = b"GET / HTTP/1.0\r\nHost: x\r\n" + LONG_LINE + b"\r\n" + b"body-bytes"
    with serving(stdlib_threading(SyncLineSizes)) as server:
        expected = request_reply(server, request)
    with serving(txsocketserver.TCPServer(ANY_PORT, AsyncLineSizes)) as server:
        assert request_reply(server, request) == expected
    assert json.loads(expected)[:4] == [16, 9, 65537, 70000 - 65536]


def test_http_server_style_parsing_in_small_pieces() -> None:
    # The request arrives a few bytes at a time: every read has to wait.
    request = b"GET / HTTP/1.0\r\nHost: x\r\n\r\nbody!"
    with serving(txsocketserver.TCPServer(ANY_PORT, AsyncLineSizes)) as server:
        with connect_to(server) as client:
            for start in range(0, len(request), 3):
                client.sendall(request[start : start + 3])
                time.sleep(0.001)
            client.shutdown(socket.SHUT_WR)
            assert json.loads(recv_all(client)) == [16, 9, 2, 5, 0]


class AsyncReads(txsocketserver.AsyncStreamRequestHandler):
    """readexactly, readuntil, read1 and their end-of-file errors."""

    async def handle(self) -> None:
        import asyncio

        out = [await self.rfile.readexactly(4), await self.rfile.readuntil(b"::")]
        out.append(await self.request.recv(100))
        buffer = bytearray(3)
        out.append(bytes(buffer[: await self.request.recv_into(buffer)]))
        try:
            await self.rfile.readuntil(b"!", limit=4)
        except asyncio.LimitOverrunError:
            out.append(b"limit")
        out.append(await self.rfile.readline())
        try:
            await self.rfile.readexactly(10)
        except asyncio.IncompleteReadError as error:
            out.append(b"incomplete:" + error.partial)
        out.append(await self.rfile.read())
        await self.request.sendall(b"|".join(out))


def test_readexactly_readuntil_and_request_coroutines() -> None:
    with serving(txsocketserver.TCPServer(ANY_PORT, AsyncReads)) as server:
        with connect_to(server) as client:
            client.sendall(b"abcdkey::value")
            time.sleep(0.05)
            client.sendall(b"xyzlong line here\ntail")
            client.shutdown(socket.SHUT_WR)
            reply = recv_all(client)
    assert reply.split(b"|") == [
        b"abcd", b"key::", b"value", b"xyz", b"limit", b"long line here\n",
        b"incomplete:tail", b"",
    ]  # fmt: skip


class TimeoutThenRead(txsocketserver.AsyncStreamRequestHandler):
    timeout = 0.2

    async def handle(self) -> None:
        try:
            await self.rfile.readline()
        except TimeoutError:
            self.wfile.write(b"timed out\n")
        self.timeout = None
        self.request.settimeout(None)
        self.wfile.write(await self.rfile.readline())


def test_a_timeout_loses_no_buffered_byte() -> None:
    # Ours only: after a timeout the stdlib's buffered file is in an undefined
    # state; our reader keeps the partial line it had.
    with serving(txsocketserver.TCPServer(ANY_PORT, TimeoutThenRead)) as server:
        with connect_to(server) as client:
            client.sendall(b"par")
            assert recv_line(client) == b"timed out\n"
            client.sendall(b"tial\n")
            assert recv_line(client) == b"partial\n"


class SyncTimeout(socketserver.StreamRequestHandler):
    timeout = 0.2

    def handle(self) -> None:
        try:
            self.rfile.readline()
        except TimeoutError as error:
            self.wfile.write(type(error).__name__.encode() + b"\n")


class AsyncTimeout(txsocketserver.AsyncStreamRequestHandler):
    timeout = 0.2

    async def handle(self) -> None:
        try:
            await self.rfile.readline()
        except TimeoutError as error:
            self.wfile.write(type(error).__name__.encode() + b"\n")


def test_timeout_raises_timeout_error_as_the_stdlib_does() -> None:
    with serving(stdlib_threading(SyncTimeout)) as server, connect_to(server) as client:
        expected = recv_all(client)
    with serving(txsocketserver.TCPServer(ANY_PORT, AsyncTimeout)) as server:
        with connect_to(server) as client:
            assert recv_all(client) == expected == b"TimeoutError\n"


# -- flow control -------------------------------------------------------------------------


class Firehose(txsocketserver.AsyncStreamRequestHandler):
    """Writes 64 KiB chunks with drain() until told to stop; reports how far it got."""

    written = 0
    done = threading.Event()

    async def handle(self) -> None:
        chunk = b"f" * 65536
        for _ in range(400):  # 25 MiB at most
            self.wfile.write(chunk)
            type(self).written += len(chunk)
            await self.wfile.drain()
        type(self).done.set()


def test_drain_waits_for_a_client_that_does_not_read() -> None:
    # Ours only: the stdlib's sendall blocks a thread instead.
    Firehose.written = 0
    Firehose.done = threading.Event()
    with serving(txsocketserver.TCPServer(ANY_PORT, Firehose)) as server:
        with connect_to(server) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            assert wait_until(lambda: Firehose.written > 0)
            time.sleep(0.3)  # time for an unbounded writer to run away
            stalled_at = Firehose.written
            assert stalled_at < 16 * 1024 * 1024, stalled_at
            assert not Firehose.done.is_set()
            # Reading lets it go on, and nothing written is lost.
            received = recv_all(client)
            assert Firehose.done.wait(WAIT)
            assert len(received) == Firehose.written == 400 * 65536


class NeverDrains(txsocketserver.AsyncStreamRequestHandler):
    max_write_buffer = 1024 * 1024

    async def handle(self) -> None:
        await self.rfile.readline()
        while True:
            self.wfile.write(b"n" * 65536)


class RecordingServer(txsocketserver.TCPServer):
    """Records handle_error's current exception, as a user's override would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.errors: list[BaseException | None] = []
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])


def test_a_writer_that_never_drains_is_aborted_at_the_cap(caplog: Any) -> None:
    server = RecordingServer(ANY_PORT, NeverDrains)
    with serving(server):
        with connect_to(server) as client:
            client.sendall(b"go\n")
            assert wait_until(lambda: server.errors)
            error = server.errors[0]
            assert isinstance(error, ConnectionAbortedError)
            assert "max_buffer" in str(error) and "drain()" in str(error)
        # The server keeps serving.
        server.RequestHandlerClass = AsyncEcho
        assert request_reply(server, b"still here\n") == b"still here\n"


class SlowReader(txsocketserver.AsyncStreamRequestHandler):
    rbufsize = 65536
    go = threading.Event()

    async def handle(self) -> None:
        from twisted.internet.threads import deferToThread

        await deferToThread(type(self).go.wait, WAIT)
        self.wfile.write(b"%d\n" % len(await self.rfile.read()))


def test_a_flooding_client_is_paused_by_tcp_flow_control() -> None:
    SlowReader.go = threading.Event()
    with serving(txsocketserver.TCPServer(ANY_PORT, SlowReader)) as server:
        with connect_to(server) as client:
            client.settimeout(0.5)
            sent = 0
            with pytest.raises(TimeoutError):
                while sent < 64 * 1024 * 1024:
                    sent += client.send(b"z" * 65536)
            # The server stopped reading: the kernel buffers hold the rest.
            assert sent < 32 * 1024 * 1024, sent
            SlowReader.go.set()
            client.settimeout(WAIT)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"%d\n" % sent


# -- hooks, errors, resets ---------------------------------------------------------------


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


class SyncResetReport(socketserver.StreamRequestHandler):
    outcome: list[str] = []
    done = threading.Event()

    def handle(self) -> None:
        try:
            self.rfile.readline()
            type(self).outcome.append(repr(self.rfile.readline()))
        except OSError as error:
            type(self).outcome.append(type(error).__name__)
        type(self).done.set()


class AsyncResetReport(txsocketserver.AsyncStreamRequestHandler):
    outcome: list[str] = []
    done = threading.Event()

    async def handle(self) -> None:
        try:
            await self.rfile.readline()
            type(self).outcome.append(repr(await self.rfile.readline()))
        except OSError as error:
            type(self).outcome.append(type(error).__name__)
        type(self).done.set()


@pytest.mark.parametrize(
    "handler, server_factory",
    [
        (SyncResetReport, stdlib_threading),
        (AsyncResetReport, lambda h: txsocketserver.TCPServer(ANY_PORT, h)),
    ],
    ids=["stdlib", "tx"],
)
def test_a_reset_mid_read_is_connection_reset_error(handler: Any, server_factory: Any) -> None:
    handler.outcome = []
    handler.done = threading.Event()
    with serving(server_factory(handler)) as server:
        client = connect_to(server)
        client.sendall(b"first\n")
        time.sleep(0.1)  # the handler is waiting for the second line
        reset_close(client)
        assert handler.done.wait(WAIT)
    assert handler.outcome == ["ConnectionResetError"]


class HalfClose(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        data = await self.rfile.read()
        self.wfile.write(b"got %d bytes\n" % len(data))
        self.wfile.write_eof()
        assert await self.rfile.read() == b""


class SyncHalfClose(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        data = self.rfile.read()
        self.wfile.write(b"got %d bytes\n" % len(data))


def test_half_close_both_ways() -> None:
    payload = b"q" * 300000
    with serving(stdlib_threading(SyncHalfClose)) as server:
        expected = request_reply(server, payload)
    with serving(txsocketserver.TCPServer(ANY_PORT, HalfClose)) as server:
        assert request_reply(server, payload) == expected == b"got 300000 bytes\n"


class CountsWrites(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        transport = self.wfile._transport
        handed: list[bytes] = []
        write = transport.write
        transport.write = lambda data: (handed.append(data), write(data))[1]
        await self.rfile.readline()
        self.wfile.write(b"status\n")
        self.wfile.writelines([b"header\n", b"\n"])
        self.wfile.write(b"body\n")
        await self.rfile.readline()
        self.wfile.write(b"%r\n" % handed)


def test_what_one_step_writes_reaches_the_transport_in_one_piece() -> None:
    # Ours only (the stdlib's unbuffered wfile sends each write): one write to
    # the transport, so one send() and the bytes of a reply leave together.
    with serving(txsocketserver.TCPServer(ANY_PORT, CountsWrites)) as server:
        with connect_to(server) as client:
            client.sendall(b"go\n")
            assert recv_all(client, 20) == b"status\nheader\n\nbody\n"
            client.sendall(b"report\n")
            assert recv_line(client) == b"[b'status\\nheader\\n\\nbody\\n']\n"


def test_a_finished_connection_leaves_no_reference_cycle() -> None:
    # Ours only: a connection's objects (protocol, streams, handler, task)
    # refer to each other; left as cycles they wait for the garbage
    # collector, whose passes cost more per connection than serving it.
    with serving(txsocketserver.TCPServer(ANY_PORT, AsyncEcho)) as server:
        serving_strategy = server._serving

        def idle() -> bool:
            return not serving_strategy.connections and not serving_strategy.tasks

        assert request_reply(server, b"warm\n") == b"warm\n"
        assert wait_until(idle)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for n in range(20):
                assert request_reply(server, b"%d\n" % n) == b"%d\n" % n
            assert wait_until(idle)
            gc.collect()
            cyclic = [
                type(o).__qualname__ for o in gc.garbage if "txsocketserver" in repr(type(o))
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert cyclic == []


class Pieces(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        while size := int(await self.rfile.readline() or 0):
            self.wfile.write(b"status\n")
            self.wfile.write(b"header\n")
            self.wfile.write(b"b" * size + b"\n")
            await self.wfile.drain()


def test_a_step_that_writes_more_than_the_flush_size_keeps_every_byte_in_order() -> None:
    # Ours only: a step's writes wait for its end, except past FLUSH_AT bytes.
    from txsocketserver._async.streams import FLUSH_AT

    with (
        serving(txsocketserver.TCPServer(ANY_PORT, Pieces)) as server,
        connect_to(server) as client,
    ):
        client.sendall(b"4\n")
        assert client.recv(1000) == b"status\nheader\nbbbb\n"
        big = 3 * FLUSH_AT
        client.sendall(b"%d\n" % big)
        expected = b"status\nheader\n" + b"b" * big + b"\n"
        got = b""
        while len(got) < len(expected):
            chunk = client.recv(1 << 20)
            assert chunk, "the server closed before the whole reply"
            got += chunk
        assert got == expected


# -- stopping: cancellation, graceful drain ----------------------------------------------------


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


# -- limits -------------------------------------------------------------------------------


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


# -- to_thread and the blocking warning ------------------------------------------------------


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


class Blocking(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        await self.rfile.readline()
        time.sleep(0.25)  # what not to do
        self.wfile.write(b"late\n")


def test_a_handler_blocking_the_reactor_is_reported(caplog: Any) -> None:
    with serving(txsocketserver.TCPServer(ANY_PORT, Blocking)) as server:
        with caplog.at_level(logging.WARNING, logger="txsocketserver"):
            assert request_reply(server, b"x\n") == b"late\n"
    assert "Blocking" in caplog.text and "held the reactor for 0.2" in caplog.text


# -- construction errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "server_class",
    [
        txsocketserver.ThreadingTCPServer,
        txsocketserver.ForkingTCPServer,
        txsocketserver.ThreadingUDPServer,
    ],
)
def test_threading_or_forking_with_an_async_handler_is_a_type_error(server_class: type) -> None:
    handler = (
        txsocketserver.AsyncDatagramRequestHandler if "UDP" in server_class.__name__ else AsyncEcho
    )
    with pytest.raises(TypeError, match="async handler"):
        server_class(ANY_PORT, handler)


def test_a_server_that_cannot_run_an_async_handler_says_so() -> None:
    class Custom(txsocketserver.BaseServer):
        pass

    with pytest.raises(TypeError, match="cannot run AsyncEcho"):
        Custom(ANY_PORT, AsyncEcho)


def test_a_coroutine_handle_on_a_sync_handler_class_is_a_type_error() -> None:
    class Mistaken(txsocketserver.StreamRequestHandler):
        async def handle(self) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match="AsyncStreamRequestHandler"):
        txsocketserver.TCPServer(ANY_PORT, Mistaken)


# -- handle_request, datagrams ------------------------------------------------------------------


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


# -- the Twisted world ---------------------------------------------------------------------------


def test_start_server_and_service_stop() -> None:
    from twisted.internet import defer

    from txsocketserver._twisted import reactor as _reactor

    server = txsocketserver.TCPServer(ANY_PORT, AsyncEcho)
    service = _reactor.call_in_reactor(lambda: txsocketserver.start_server(server))
    assert request_reply(server, b"twisted world\n") == b"twisted world\n"
    _reactor.call_in_reactor(lambda: defer.maybeDeferred(service.stopService))
    with pytest.raises(OSError):
        connect_to(server, timeout=1)


# -- resources -----------------------------------------------------------------------------------


def test_importing_the_async_classes_loads_no_twisted() -> None:
    script = f"""
        import sys
        sys.path.insert(0, {SRC!r})
        import txsocketserver

        class Handler(txsocketserver.AsyncStreamRequestHandler):
            async def handle(self):
                pass

        class Datagrams(txsocketserver.AsyncDatagramRequestHandler):
            pass

        heavy = sorted(n for n in sys.modules if n.split(".")[0] in ("twisted", "zope", "asyncio"))
        assert not heavy, heavy
        print("ok")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


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


class TwoWriters(txsocketserver.AsyncStreamRequestHandler):
    """Two coroutines draining at once, and a read driven by Twisted's own driver."""

    async def handle(self) -> None:
        from twisted.internet.defer import Deferred, gatherResults

        await self.rfile.readline()

        async def write(tag: bytes) -> bytes:
            for _ in range(50):
                self.wfile.write(tag * 65536)
                await self.wfile.drain()
            return tag

        tags = await gatherResults(
            [Deferred.fromCoroutine(write(b"a")), Deferred.fromCoroutine(write(b"b"))]
        )
        line = await Deferred.fromCoroutine(self._line())
        self.wfile.write(b"|" + b"".join(tags) + b"|" + line)

    async def _line(self) -> bytes:
        return await self.rfile.readline()


def test_several_coroutines_drain_at_once_and_streams_work_under_deferreds() -> None:
    with serving(txsocketserver.TCPServer(ANY_PORT, TwoWriters)) as server:
        with connect_to(server) as client:
            client.sendall(b"go\n")
            time.sleep(0.3)  # both writers are waiting in drain() by now
            client.sendall(b"la")
            time.sleep(0.05)
            client.sendall(b"st\n")
            client.shutdown(socket.SHUT_WR)
            received = recv_all(client)
    body, tags, line = received.split(b"|")
    assert (tags, line) == (b"ab", b"last\n")
    assert body.count(b"a") == body.count(b"b") == 50 * 65536


def test_haproxy_header_from_an_untrusted_peer_is_refused() -> None:
    # The same header stage as for blocking handlers: only a trusted proxy may
    # name the client (here 127.0.0.1 is not one), so a client that reaches
    # the port directly cannot pass as 198.51.100.7.
    server = txsocketserver.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", AsyncAddress)
    server.trusted_proxies = ("192.0.2.0/24",)
    with serving(server), connect(server.server_address) as client:
        client.sendall(b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 443\r\n")
        assert client.recv(1024) == b""
