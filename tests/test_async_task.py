"""``_async/task.py``: the driver of a handler's coroutines.

What a step writes leaves in one piece; a step holding the reactor too long
is reported.

Every test runs twice: connections read by the reactor, and through the
server's read multiplexer (``async_support.reads``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from twisted.internet.defer import CancelledError

import txsocketserver
from async_support import (
    RecordingServer,
    reads,  # noqa: F401 (an autouse fixture: both read modes)
    serving,
)
from support import (
    ANY_PORT,
    connect_to,
    recv_all,
    recv_line,
    request_reply,
)


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


class Phases(txsocketserver.AsyncStreamRequestHandler):
    """Fails where the client's line says; records the phases that ran."""

    ran: list[str] = []

    async def setup(self) -> None:
        await super().setup()
        line = await self.rfile.readline()
        self.line = line.strip().decode()
        type(self).ran.append("setup")
        if "setup" in self.line:
            raise ValueError("in setup")

    async def handle(self) -> None:
        type(self).ran.append("handle")
        if "handle" in self.line:
            raise KeyError("in handle")
        if "cancel" in self.line:
            raise CancelledError()
        self.wfile.write(b"handled\n")

    async def finish(self) -> None:
        type(self).ran.append("finish")
        if "finish" in self.line:
            raise OSError("in finish")


@pytest.mark.parametrize(
    ("line", "ran", "errors"),
    [
        (b"fine\n", ["setup", "handle", "finish"], []),
        # A setup() that raises: no handle(), no finish(), as in the stdlib.
        (b"setup\n", ["setup"], ["ValueError('in setup')"]),
        # finish() after handle(), however it ended; then handle()'s error.
        (b"handle\n", ["setup", "handle", "finish"], ["KeyError('in handle')"]),
        (b"finish\n", ["setup", "handle", "finish"], ["OSError('in finish')"]),
        # A cancellation that reaches the top is not an error.
        (b"cancel\n", ["setup", "handle", "finish"], []),
    ],
)
def test_setup_handle_finish_run_in_the_stdlib_order_whatever_raises(
    line: bytes, ran: list[str], errors: list[str]
) -> None:
    Phases.ran = []
    server = RecordingServer(ANY_PORT, Phases)
    with serving(server):
        expected = b"handled\n" if line in (b"fine\n", b"finish\n") else b""
        assert request_reply(server, line) == expected
    assert Phases.ran == ran
    assert [repr(e) for e in server.errors] == errors


def test_what_finish_raises_after_handle_raised_has_handles_error_as_context() -> None:
    Phases.ran = []
    server = RecordingServer(ANY_PORT, Phases)
    with serving(server):
        assert request_reply(server, b"handle finish\n") == b""
    assert Phases.ran == ["setup", "handle", "finish"]
    [error] = server.errors
    assert repr(error) == "OSError('in finish')"
    assert repr(error.__context__) == "KeyError('in handle')"


class SyncHandle(txsocketserver.AsyncStreamRequestHandler):
    finished: list[bool] = []

    async def setup(self) -> None:
        await super().setup()
        await self.rfile.readline()

    def handle(self) -> None:  # type: ignore[override]  # a mistake: not async
        self.wfile.write(b"ran\n")

    async def finish(self) -> None:
        type(self).finished.append(True)


def test_a_handle_that_is_not_a_coroutine_is_a_type_error_and_finish_still_runs() -> None:
    SyncHandle.finished = []
    server = RecordingServer(ANY_PORT, SyncHandle)
    with serving(server):
        assert request_reply(server, b"x\n") == b"ran\n"
    [error] = server.errors
    assert isinstance(error, TypeError) and "await" in str(error)
    assert SyncHandle.finished == [True]


class BadTimeout(txsocketserver.AsyncStreamRequestHandler):
    # The default setup() (the task runs it before handle(), with no
    # coroutine around them) fails: handle() never runs, handle_error() sees why.
    timeout = -1
    handled: list[bool] = []

    async def handle(self) -> None:
        type(self).handled.append(True)


def test_a_failing_default_setup_reaches_handle_error_and_handle_never_runs() -> None:
    BadTimeout.handled = []
    server = RecordingServer(ANY_PORT, BadTimeout)
    with serving(server):
        with connect_to(server) as client:
            assert client.recv(16) == b""  # closed at once, nothing sent
    assert [repr(e) for e in server.errors] == ["ValueError('Timeout value out of range')"]
    assert BadTimeout.handled == []
