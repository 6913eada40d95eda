"""``_async/streams.py``: the reader, the writer and the socket-shaped request.

The reads follow ``io``'s semantics (differential against the stdlib's
handlers), timeouts lose no byte, flow control works both ways, a reset
reads as ``ConnectionResetError``.

Every test runs twice: connections read by the reactor, and through the
server's read multiplexer (``async_support.reads``).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from typing import Any

import pytest

import txsocketserver
from async_handlers import AsyncEcho
from async_support import (
    RecordingServer,
    reads,  # noqa: F401 (an autouse fixture: both read modes)
    serving,
    stdlib_threading,
)
from support import (
    ANY_PORT,
    WAIT,
    connect_to,
    recv_all,
    recv_line,
    request_reply,
    reset_close,
    wait_until,
)

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
