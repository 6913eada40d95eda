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

import txsocketserver
from async_support import (
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
