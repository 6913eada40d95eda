# -*- test-case-name: tests.test_adopted_transport -*-
"""The transport of a connection an async server accepted itself, and the read multiplexer.

Mechanism for the async data path (``docs/architecture.md``, "A server with
an async handler class"): :func:`adopted_transport` makes a Twisted transport
of an accepted socket that sends at once, and :class:`ReadMultiplexer` reads
many such connections in one reactor event.  What they need of Twisted's
private API is read in ``compat``.  Reactor thread only.
"""

from __future__ import annotations

from typing import Any

from txsocketserver._twisted import compat


def _adopted_class(transport_class: Any) -> Any:
    """*transport_class* (``tcp.Server`` or ``unix.Server``) as the transport
    of a connection the server accepted itself.

    Three differences, all for speed and none visible to the protocol:

    * **Writes go at once.**  Twisted's ``write()`` always queues and sends on
      the reactor's next turn: for a request-reply protocol that is an
      ``epoll_ctl`` to watch for writability, a reactor turn to learn it and
      another ``epoll_ctl`` to stop, for every reply.  Here ``write()`` tries
      ``send()`` first when Twisted holds no bytes (nor, on Unix, descriptors
      to pass with them), as asyncio's transports do, and queues only what the
      kernel did not take; an error other than "would block" is left to
      Twisted's own write path, which meets it again and closes the connection
      as always.  The async writer calls ``write()`` once per handler step with
      what the step wrote, so the bytes of one reply leave together.
    * **Reads come through a** :class:`ReadMultiplexer` when one is given:
      ``startReading``/``stopReading`` register with it instead of the reactor.
    * **A close with nothing left to send happens at once**, as Twisted's own
      ``loseConnection`` does once the write side is shut, instead of waiting
      a reactor turn for writability to find nothing to write.

    And one that only saves memory (an idle connection is mostly its
    objects): the log prefix and ``repr`` that Twisted formats and keeps per
    connection are shared by all (``compat.shared_transport_attributes``).
    """

    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    # One for every close, as the reactor's _disconnectSelectable keeps one.
    closed = Failure(ConnectionDone())

    class Adopted(transport_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, multiplexer: ReadMultiplexer | None) -> None:
            self._multiplexer = multiplexer
            self._read_fd: int | None = None  # while the multiplexer reads it
            super().__init__(*args)

        def startReading(self) -> None:
            if self._multiplexer is None:
                super().startReading()
            else:
                self._multiplexer.add(self)

        def stopReading(self) -> None:
            if self._multiplexer is None:
                super().stopReading()
            else:
                self._multiplexer.remove(self)

        _holds_nothing = compat.nothing_queued
        _can_send_now = compat.can_send_now

        def write(self, data: bytes) -> None:
            if not self._can_send_now():
                super().write(data)
                return
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0
            if sent < len(data):
                super().write(data[sent:])

        def loseConnection(self) -> None:
            if (
                self.connected
                and not self.disconnecting
                and self.producer is None
                and self._holds_nothing()
            ):
                self.stopReading()
                self.stopWriting()
                self.connectionLost(closed)
                return
            super().loseConnection()

    for name, value in compat.shared_transport_attributes(_LOG_PREFIX, _REPR).items():
        setattr(Adopted, name, value)
    Adopted.__name__ = Adopted.__qualname__ = f"Adopted{transport_class.__name__}"
    return Adopted


_ADOPTED: dict[bool, Any] = {}
_LOG_PREFIX = "txsocketserver"
_REPR = "<txsocketserver async connection>"


def adopted_transport(
    sock: Any,
    protocol: Any,
    client_address: Any,
    session: int,
    reactor: Any,
    *,
    unix: bool,
    multiplexer: ReadMultiplexer | None = None,
) -> Any:
    """A transport for *sock*, a connection the server accepted itself, to
    give *protocol* (``makeConnection``).

    What ``IReactorSocket.adoptStreamConnection`` does, minus its ``dup()``
    and ``getpeername()`` (the address is known already, and a client that
    reset before this point would make its ``getpeername`` fail and leak the
    dup), plus what ``_adopted_class`` says.
    """
    kind = _ADOPTED.get(unix)
    if kind is None:
        kind = _ADOPTED[unix] = _adopted_class(compat.stream_server_transport(unix))
    return kind(sock, protocol, client_address, None, session, reactor, multiplexer=multiplexer)


class ReadMultiplexer:
    """The read readiness of many connections, watched by the reactor as one
    descriptor: an ``epoll`` set of their sockets.

    Twisted's reactor wraps each event of each descriptor in a logging
    context (``log.callWithLogger``) before ``doRead`` is called; with many
    busy connections that costs more than the read.  Here the reactor sees
    one event for the set, and every connection ready in it is read in one
    pass, calling the transport's own ``doRead`` and disconnecting it as the
    reactor would (``_disconnectSelectable``).  Writes still go through the
    reactor (only a full send buffer needs them).  Linux only
    (:meth:`for_reactor` says ``None`` elsewhere).

    Made by a server's async strategy for its accepted connections and
    closed with it (:meth:`retire`).  Reactor thread only.
    """

    def __init__(self, reactor: Any) -> None:
        import select

        self._reactor = reactor
        self._epoll = select.epoll()
        self._in = select.EPOLLIN
        self._transports: dict[int, Any] = {}
        self._retiring = False
        self._disconnect = compat.disconnector(reactor)
        reactor.addReader(self)

    @classmethod
    def for_reactor(cls, reactor: Any) -> ReadMultiplexer | None:
        """A multiplexer on *reactor*, or ``None`` where there cannot be one
        (no ``epoll``, or a reactor without ``_disconnectSelectable``)."""
        import select

        if not hasattr(select, "epoll") or compat.disconnector(reactor) is None:
            return None
        return cls(reactor)

    # -- IReadDescriptor -----------------------------------------------------------------

    def fileno(self) -> int:
        return self._epoll.fileno()

    def logPrefix(self) -> str:
        return "txsocketserver"

    def doRead(self) -> None:
        transports = self._transports
        disconnect = self._disconnect
        for fd, _ in self._epoll.poll(0, max(1, len(transports))):
            transport = transports.get(fd)
            if transport is None:
                continue  # stopped reading earlier in this pass
            try:
                why = transport.doRead()
            except BaseException as exc:
                from twisted.python import log

                why = exc
                log.err()
            if why:
                # The reactor's disconnect removes the transport from its own
                # sets only: take it out of ours first, or its EOF would be
                # read again.
                self.remove(transport)
                disconnect(transport, why, True)

    def connectionLost(self, reason: Any) -> None:
        """The reactor is shutting down: so is every connection read here."""
        for transport in list(self._transports.values()):
            self.remove(transport)
            transport.connectionLost(reason)
        self._close()

    # -- for the transports and the server -------------------------------------------------

    def add(self, transport: Any) -> None:
        if transport._read_fd is not None or self._epoll.closed:
            return
        fd = transport.fileno()
        stale = self._transports.get(fd)
        if stale is not None:
            # A closed connection's, whose descriptor the kernel gave again.
            stale._read_fd = None
        self._transports[fd] = transport
        transport._read_fd = fd
        try:
            self._epoll.register(fd, self._in)
        except FileExistsError:
            self._epoll.modify(fd, self._in)

    def remove(self, transport: Any) -> None:
        fd, transport._read_fd = transport._read_fd, None
        if fd is None or self._transports.get(fd) is not transport:
            return
        del self._transports[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # the socket is closed already: epoll forgot it then
        if self._retiring and not self._transports:
            self._close()

    def retire(self) -> None:
        """Close once the last connection has stopped reading (now if none is)."""
        self._retiring = True
        if not self._transports:
            self._close()

    def _close(self) -> None:
        if not self._epoll.closed:
            self._reactor.removeReader(self)
            self._epoll.close()


__all__ = ["ReadMultiplexer", "adopted_transport"]
