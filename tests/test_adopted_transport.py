"""``_twisted/adopted_transport.py``: the transport of an accepted async connection, and
the read multiplexer."""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone

from txsocketserver._twisted.adopted_transport import ReadMultiplexer, adopted_transport


def test_an_accepted_connections_transport_sends_at_once_and_reads_through_a_multiplexer() -> None:
    # Twisted's own transport, adopted: it sends before the reactor turns,
    # reads through the multiplexer, sees the EOF once, and ends cleanly.
    import queue

    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Protocol
    from zope.interface import implementer

    from txsocketserver._twisted.reactor import call_in_reactor

    events: queue.SimpleQueue[tuple[object, ...]] = queue.SimpleQueue()

    @implementer(IHalfCloseableProtocol)
    class Recorder(Protocol):
        def dataReceived(self, data: bytes) -> None:
            events.put(("data", data))

        def readConnectionLost(self) -> None:
            events.put(("eof",))
            self.transport.write(b"after eof")
            self.transport.loseConnection()

        def writeConnectionLost(self) -> None:
            pass

        def connectionLost(self, reason: object) -> None:
            events.put(("lost", type(reason.value)))

    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    protocol = Recorder()

    def connect() -> tuple[ReadMultiplexer, bytes]:
        multiplexer = ReadMultiplexer.for_reactor(reactor)
        assert multiplexer is not None, "Linux reactors have epoll and _disconnectSelectable"
        ours.setblocking(False)
        transport = adopted_transport(
            ours, protocol, "peer", 1, reactor, unix=True, multiplexer=multiplexer
        )
        protocol.makeConnection(transport)
        # Read through the multiplexer, it keeps no bound fileno method; the
        # socket's is made when asked.
        assert "fileno" not in vars(transport)
        assert transport.fileno() == ours.fileno()
        transport.write(b"at once")
        # Before the reactor turns: the bytes are in the peer's socket already.
        return multiplexer, theirs.recv(100, socket.MSG_DONTWAIT)

    try:
        multiplexer, sent = call_in_reactor(connect)
        assert sent == b"at once"
        theirs.sendall(b"hello")
        assert events.get(timeout=10) == ("data", b"hello")
        theirs.shutdown(socket.SHUT_WR)
        assert events.get(timeout=10) == ("eof",)
        assert theirs.recv(100) == b"after eof"
        assert theirs.recv(100) == b""
        assert events.get(timeout=10) == ("lost", ConnectionDone)
        assert events.empty(), "the EOF was read once"
        assert call_in_reactor(lambda: protocol.transport.fileno()) == -1
        call_in_reactor(multiplexer.retire)
        assert multiplexer._epoll.closed
    finally:
        theirs.close()
        ours.close()
