"""What the async handler tests share (``test_async_*.py``): the two read modes, helpers."""

from __future__ import annotations

import contextlib
import os
import socketserver
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import txsocketserver
from support import ANY_PORT, connect_to, recv_line, request_reply, serve_in_thread

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


class RecordingServer(txsocketserver.TCPServer):
    """Records handle_error's current exception, as a user's override would."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.errors: list[BaseException | None] = []
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])
