"""``max_connections`` and ``idle_timeout`` on blocking servers: sync, threading, forking.

Ours only: the stdlib has neither (the async servers' limits are in test_async_serving.py).
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

import txsocketserver
from forking_handlers import TxEcho
from support import ANY_PORT, WAIT, connect_to, recv_all, recv_line, serve_in_thread

KINDS = {
    "threading": txsocketserver.ThreadingTCPServer,
    "forking": txsocketserver.ForkingTCPServer,
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_max_connections_leaves_the_next_client_in_the_backlog(kind: str) -> None:
    server = KINDS[kind](ANY_PORT, TxEcho)
    server.max_connections = 2
    server.daemon_threads = True
    with server, serve_in_thread(server):
        held = [connect_to(server) for _ in range(2)]
        for client in held:
            client.sendall(b"held\n")
            assert recv_line(client) == b"held\n"
        with connect_to(server) as waiting:
            waiting.sendall(b"waiting\n")
            waiting.settimeout(0.4)
            with pytest.raises(TimeoutError):
                waiting.recv(100)
            held[0].shutdown(socket.SHUT_WR)
            assert recv_all(held[0]).startswith(b"pid ")
            waiting.settimeout(WAIT)
            assert recv_line(waiting) == b"waiting\n"
            waiting.shutdown(socket.SHUT_WR)
            assert recv_all(waiting).startswith(b"pid ")
        for client in held:
            client.close()


class Recording(txsocketserver.ThreadingTCPServer):
    daemon_threads = True
    idle_timeout = 0.3

    def __init__(self, *args: Any) -> None:
        self.errors: list[str] = []
        super().__init__(*args)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        self.errors.append(type(sys.exc_info()[1]).__name__)


@pytest.mark.parametrize("kind", ["sync", "threading", "forking"])
def test_idle_timeout_closes_a_quiet_connection(kind: str) -> None:
    classes = {
        "sync": txsocketserver.TCPServer,
        "threading": Recording,
        "forking": txsocketserver.ForkingTCPServer,
    }
    server = classes[kind](ANY_PORT, TxEcho)
    server.idle_timeout = 0.3
    with server, serve_in_thread(server), connect_to(server) as client:
        for _ in range(3):  # progress keeps it open past the timeout
            client.sendall(b"tick\n")
            assert recv_line(client) == b"tick\n"
            last_activity = time.monotonic()
            time.sleep(0.15)
        # The handler's read times out: the connection is closed (without the
        # handler's last "pid" line: its readline raised).
        assert recv_all(client) == b""
        assert 0.25 < time.monotonic() - last_activity < WAIT
    if kind == "threading":
        assert server.errors == ["TimeoutError"]
