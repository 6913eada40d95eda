"""``max_connections`` loses no client: those beyond the cap wait in the kernel.

With the stdlib's default ``request_queue_size`` (5) as the listen backlog, a
capped server that stops accepting overflows the kernel's accept queue at
once; the clients dropped there retry their handshake seconds later, or are
reset.  ``listeners.listen_backlog`` sizes the kernel's queue for them
(``docs/async.md``, "Limits and costs").
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest

import txsocketserver
from support import serve_in_thread

CLIENTS = 200
CAP = 50
HOLD = 0.5  # seconds each handler holds its connection
# Every client served within this (ideally CLIENTS / CAP * HOLD = 2 s; a client
# the kernel dropped retries its handshake after 1 s, then 3 s, 7 s...).
DEADLINE = 10.0
# A forked request costs a process: more on a loaded machine.
DEADLINES = {"forking": 20.0}
HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40123 443\r\n"
ENDPOINT = "haproxy:tcp:0:interface=127.0.0.1"


class Held(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        time.sleep(HOLD)
        self.wfile.write(line)


class AsyncHeld(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        from twisted.internet import reactor, task

        line = await self.rfile.readline()
        await task.deferLater(reactor, HOLD, lambda: None)
        self.wfile.write(line)


class CappedThreading(txsocketserver.ThreadingTCPServer):
    max_connections = CAP


class CappedForking(txsocketserver.ForkingTCPServer):
    max_connections = CAP
    max_children = CAP


class CappedAsync(txsocketserver.TCPServer):
    max_connections = CAP


KINDS = {
    "threading": (CappedThreading, ("127.0.0.1", 0), Held),
    "forking": (CappedForking, ("127.0.0.1", 0), Held),
    "async": (CappedAsync, ("127.0.0.1", 0), AsyncHeld),
    "threading_endpoint": (CappedThreading, ENDPOINT, Held),
    "async_endpoint": (CappedAsync, ENDPOINT, AsyncHeld),
}


def accept_queue_limit(sock: socket.socket) -> int:
    """The kernel's limit on the accept queue of a listening socket: Linux's
    ``TCP_INFO`` gives it as ``tcpi_sacked`` (``tcpi_unacked``: the queue now)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 28)[0])


def serve_clients(server: Any, header: bytes, deadline: float = DEADLINE) -> list[bool]:
    served = [False] * CLIENTS
    start = time.monotonic()

    def client(number: int) -> None:
        line = f"client {number}\n".encode()
        try:
            with socket.create_connection(server.server_address, timeout=deadline) as sock:
                sock.sendall(header + line)
                sock.settimeout(max(0.01, start + deadline - time.monotonic()))
                served[number] = sock.makefile("rb").readline() == line
        except OSError:
            pass

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(deadline + 5)
    return served


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_client_beyond_the_cap_is_served(kind: str) -> None:
    server_class, address, handler = KINDS[kind]
    assert server_class.request_queue_size == 5  # the stdlib's default, untouched
    with server_class(address, handler) as server, serve_in_thread(server):
        header = HEADER if "endpoint" in kind else b""
        served = serve_clients(server, header, DEADLINES.get(kind, DEADLINE))
    assert served.count(True) == CLIENTS


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux's")
def test_the_kernel_queues_the_clients_beyond_the_cap() -> None:
    with CappedThreading(("127.0.0.1", 0), Held) as capped:
        assert accept_queue_limit(capped.socket) >= CLIENTS - CAP
    with txsocketserver.ThreadingTCPServer(("127.0.0.1", 0), Held) as uncapped:
        # Without a cap nothing waits beyond it: the stdlib's backlog.
        assert accept_queue_limit(uncapped.socket) == 5


def test_a_cap_set_on_the_instance_widens_the_backlog_when_serving() -> None:
    server = txsocketserver.ThreadingTCPServer(("127.0.0.1", 0), Held)
    with server:
        server.max_connections = CAP
        with serve_in_thread(server):
            assert serve_clients_once(server) == b"one\n"
        if hasattr(socket, "TCP_INFO"):
            assert accept_queue_limit(server.socket) >= CLIENTS - CAP


def serve_clients_once(server: Any) -> bytes:
    with socket.create_connection(server.server_address, timeout=DEADLINE) as sock:
        sock.sendall(b"one\n")
        return sock.makefile("rb").readline()
