# -*- test-case-name: tests.test_twisted_compat -*-
"""Twisted's private API, read in this one place.

Serving ``tcp:``, ``tcp6:``, ``unix:`` and ``ssl:`` descriptions on a socket
of the server's own (``docs/architecture.md``) needs what Twisted parsed out
of a description, reading the PROXY header ourselves needs the endpoint that
``haproxy:`` wraps, bounding what silent clients can hold needs the size of
a port's accept batch, and half-closing through a wrapper needs to know what
the wrapper does to the bytes, and the fast transport of an accepted async
connection needs Twisted's transport buffers and its reactor's disconnect.
Twisted has no public API for these.  Each
assumption is
written once here, and ``tests/test_twisted_compat.py`` checks each against
the installed Twisted, so a release that breaks one fails the suite rather
than quietly moving an endpoint to the slower path (where, among other
things, forking cannot serve it).  ``.ci/run`` runs the suite on the oldest
Twisted that ``pyproject.toml`` admits and on the newest.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple


class TCPParameters(NamedTuple):
    port: int
    interface: str
    backlog: int


class UNIXParameters(NamedTuple):
    address: str
    backlog: int
    mode: int
    # Twisted's lockfile=1 (its default): hold PATH.lock, clean a stale socket.
    lockfile: bool


def tcp_parameters(endpoint: Any) -> TCPParameters | None:
    """What a ``TCP4ServerEndpoint``/``TCP6ServerEndpoint`` (or the TCP part of an
    ``SSL4ServerEndpoint``) listens on; ``None`` for any other type, subclasses
    included (they may listen differently)."""
    from twisted.internet import endpoints

    kinds = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)
    if type(endpoint) not in (*kinds, endpoints.SSL4ServerEndpoint):
        return None
    return TCPParameters(endpoint._port, endpoint._interface, endpoint._backlog)


def unix_parameters(endpoint: Any) -> UNIXParameters | None:
    """What a ``UNIXServerEndpoint`` listens on; ``None`` for any other type."""
    from twisted.internet import endpoints

    if type(endpoint) is not endpoints.UNIXServerEndpoint:
        return None
    return UNIXParameters(
        endpoint._address, endpoint._backlog, endpoint._mode, bool(endpoint._wantPID)
    )


def ssl_description_options(description: str) -> dict[str, Any] | None:
    """The options of an ``ssl:`` description, by the names and defaults of
    Twisted's own ``ssl:`` parser (``privateKey``, ``certKey``,
    ``extraCertChain``, ``dhParameters``, ``sslmethod``, ``interface``,
    ``backlog``, ``port``), or ``None`` if it is not one this parser takes."""
    from twisted.internet import endpoints

    arguments, options = endpoints._parse(description)
    if not arguments or arguments[0] != "ssl":
        return None
    try:
        bound = inspect.signature(endpoints._parseSSL).bind(None, *arguments[1:], **options)
    except TypeError:
        return None
    bound.apply_defaults()
    chosen = dict(bound.arguments)
    chosen.pop("factory")
    return chosen


def proxied_endpoint(endpoint: Any) -> Any:
    """The endpoint a PROXY-protocol endpoint (``haproxy:...``,
    ``proxyEndpoint(...)``) wraps, or ``None`` for any other endpoint.

    Reads the private ``_WrapperServerEndpoint``'s ``_wrapperFactory`` and
    ``_wrappedEndpoint``, which ``proxyEndpoint`` has returned since Twisted 16.
    """
    from twisted.internet.endpoints import _WrapperServerEndpoint
    from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

    if (
        isinstance(endpoint, _WrapperServerEndpoint)
        and getattr(endpoint, "_wrapperFactory", None) is HAProxyWrappingFactory
    ):
        return endpoint._wrappedEndpoint
    return None


def cap_accept_batch(port: Any, free: int) -> None:
    """Make *port*'s next accept batch no larger than *free* (at least 1).

    A POSIX port accepts ``numberAccepts`` connections per readable event
    (growing it after each full batch), ``stopReading()`` or not; a port
    without it (another reactor's) is left alone.
    """
    number = getattr(port, "numberAccepts", None)
    if isinstance(number, int):
        port.numberAccepts = max(1, min(number, free))


def half_close(transport: Any) -> Any:
    """The ``loseWriteConnection`` that half-closes the bytes a protocol writes
    to *transport*, or ``None`` if it cannot.

    A ``ProtocolWrapper`` that does not override ``write`` passes the bytes
    through unchanged, so half-closing the transport below it is right; one
    that transforms them (TLS) forwards unknown attributes to the TCP
    transport too, whose ``loseWriteConnection`` would cut the TLS stream
    mid-record: refused, unless the wrapper defines its own.
    """
    from twisted.protocols.policies import ProtocolWrapper

    for _ in range(16):
        if isinstance(transport, ProtocolWrapper):
            if "loseWriteConnection" in vars(type(transport)):
                return transport.loseWriteConnection
            if type(transport).write is not ProtocolWrapper.write:
                return None
            transport = transport.transport
            continue
        method = getattr(transport, "loseWriteConnection", None)
        return method if callable(method) else None
    return None


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

        def _holds_nothing(self) -> bool:
            """Whether Twisted has no bytes (nor, on Unix, descriptors) queued."""
            return not (
                self.dataBuffer or self._tempDataBuffer or getattr(self, "_sendmsgQueue", None)
            )

        def write(self, data: bytes) -> None:
            if not self.connected or self._writeDisconnected or not self._holds_nothing():
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

    Adopted.__name__ = Adopted.__qualname__ = f"Adopted{transport_class.__name__}"
    return Adopted


_ADOPTED: dict[bool, Any] = {}


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
    dup), plus what ``_adopted_class`` says.  ``tcp.Server`` and
    ``unix.Server`` take exactly these arguments since Twisted 8; a port of
    ``None`` is what ``adoptStreamConnection`` passes too.
    """
    kind = _ADOPTED.get(unix)
    if kind is None:
        from twisted.internet import tcp
        from twisted.internet import unix as unix_module

        kind = _ADOPTED[unix] = _adopted_class(unix_module.Server if unix else tcp.Server)
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
        reactor.addReader(self)

    @classmethod
    def for_reactor(cls, reactor: Any) -> ReadMultiplexer | None:
        """A multiplexer on *reactor*, or ``None`` where there cannot be one
        (no ``epoll``, or a reactor without ``_disconnectSelectable``)."""
        import select

        if not hasattr(select, "epoll") or not hasattr(reactor, "_disconnectSelectable"):
            return None
        return cls(reactor)

    # -- IReadDescriptor -----------------------------------------------------------------

    def fileno(self) -> int:
        return self._epoll.fileno()

    def logPrefix(self) -> str:
        return "txsocketserver"

    def doRead(self) -> None:
        transports = self._transports
        disconnect = self._reactor._disconnectSelectable
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


__all__ = [
    "ReadMultiplexer",
    "TCPParameters",
    "adopted_transport",
    "cap_accept_batch",
    "half_close",
    "proxied_endpoint",
    "UNIXParameters",
    "ssl_description_options",
    "tcp_parameters",
    "unix_parameters",
]
