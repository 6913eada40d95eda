"""``_async/protocol.py``: one Twisted protocol per async connection.

Half-closes both ways, the PROXY header stage behind ``haproxy:``, and a
finished connection freed without the garbage collector.

Every test runs twice: connections read by the reactor, and through the
server's read multiplexer (``async_support.reads``).
"""

from __future__ import annotations

import gc
import json
import socketserver

import txsocketserver
from async_handlers import AsyncAddress, AsyncEcho
from async_support import (
    reads,  # noqa: F401 (an autouse fixture: both read modes)
    serving,
    stdlib_threading,
)
from support import (
    ANY_PORT,
    LOCALHOST,
    connect,
    recv_line,
    request_reply,
    wait_until,
)


def test_haproxy_gives_the_real_client_address() -> None:
    server = txsocketserver.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", AsyncAddress)
    with serving(server), connect(server.server_address) as client:
        client.sendall(b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 443\r\n")
        reply = json.loads(recv_line(client))
    assert reply["client"] == ["198.51.100.7", 40123]
    assert reply["server"] == ["203.0.113.1", 443]


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


def test_haproxy_header_from_an_untrusted_peer_is_refused() -> None:
    # The same header stage as for blocking handlers: only a trusted proxy may
    # name the client (here 127.0.0.1 is not one), so a client that reaches
    # the port directly cannot pass as 198.51.100.7.
    server = txsocketserver.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", AsyncAddress)
    server.trusted_proxies = ("192.0.2.0/24",)
    with serving(server), connect(server.server_address) as client:
        client.sendall(b"PROXY TCP4 198.51.100.7 203.0.113.1 40123 443\r\n")
        assert client.recv(1024) == b""
