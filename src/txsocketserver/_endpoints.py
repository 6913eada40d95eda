"""Endpoint mode: a stream server fed by a Twisted server endpoint.

Theory of operation
===================

A stream server normally owns a listening socket and accepts from it itself.
Given an :class:`Endpoint` as its address instead (or, for ``TCPServer`` and
its subclasses, a ``str`` containing ``":"``), it owns an
:class:`EndpointListener` and no socket:

* ``server_bind()`` asks the endpoint to listen (``tcp:``, ``tcp6:``, ``unix:``,
  ``ssl:``, ``systemd:``, ``haproxy:``..., anything ``serverFromString``
  parses).  Twisted accepts the connections, does the TLS or reads the PROXY
  header, and for each connection a
  :class:`~txsocketserver._transport_socket.TransportSocketProtocol` hands a
  :class:`~txsocketserver._transport_socket.TransportSocket` and the client's
  address to :meth:`EndpointListener._on_connection`, on the reactor thread.
* That callback appends ``(transport_socket, client_address)`` to a queue and
  wakes the serving thread through :class:`EndpointReadiness`, the endpoint
  counterpart of the socket readiness.
* ``get_request()`` takes the next queued connection.  ``verify_request``,
  ``process_request``, threading and the limits apply unchanged: the
  ``request`` is always a ``TransportSocket``, whatever the endpoint (one
  mechanism for every endpoint, plain ``tcp:`` included).

The queue plays the role of the kernel's listen backlog: once
``request_queue_size`` connections wait in it, the port stops accepting until
``get_request()`` takes one, so a busy synchronous server leaves the next
clients in the kernel backlog exactly as a socket server does.

Which thread owns what: the port, the factory and the protocols belong to the
reactor thread; the queue is shared under one lock; ``get_request`` runs in the
serving thread.  ``close()`` may be called from any thread.
"""

from __future__ import annotations

import collections
import errno
import socket
import ssl
import threading
from typing import Any, NamedTuple, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from txsocketserver import _reactor
from txsocketserver._readiness import IRequestReadiness
from txsocketserver._transport_socket import (
    SocketAddress,
    TransportSocket,
    TransportSocketFactory,
    TransportSocketProtocol,
    bad_file_descriptor,
    socket_address,
    socket_family,
)

_T = TypeVar("_T")

#: Seconds ``server_close()`` waits for the connections its handlers closed to
#: finish sending (a transport closes asynchronously, after its buffer drains).
CLOSE_FLUSH_TIMEOUT = 5.0


# What Twisted's TLS needs (its ``tls`` extra), which ours installs.
TLS_EXTRA_MODULES = frozenset({"OpenSSL", "service_identity"})


class Endpoint:
    """A Twisted server endpoint, used as a stream server's ``server_address``.

    ``TCPServer(Endpoint("ssl:8443:privateKey=key.pem:certKey=cert.pem"), Handler)``
    serves ``Handler`` over TLS; every stream server class (``TCPServer``,
    ``UnixStreamServer``, their threading and forking variants, subclasses)
    accepts one.  For the ``TCPServer`` family a ``str`` containing ``":"`` is
    read as an endpoint description too (``TCPServer("tcp:8000", Handler)``);
    for ``UnixStreamServer`` a ``str`` stays a socket path, so wrap it.

    Args:
        endpoint: an endpoint description for
            ``twisted.internet.endpoints.serverFromString`` (``"tcp:8000"``,
            ``"tcp6:8000:interface=\\:\\:1"``, ``"unix:/run/app.sock"``,
            ``"ssl:8443:privateKey=key.pem:certKey=cert.pem"``,
            ``"systemd:domain=INET:index=0"``, ``"haproxy:tcp:8080"``), or an
            ``IStreamServerEndpoint`` object.

    Error handling:
        ``ValueError`` for a description Twisted cannot parse (unknown type,
        bad argument, unreadable certificate), raised when the server is
        created; for an ``ssl:`` description without the TLS libraries
        (pyOpenSSL, service_identity), a ``ValueError`` saying to install
        ``txsocketserver[tls]``.
    """

    def __init__(self, endpoint: str | IStreamServerEndpoint) -> None:
        if isinstance(endpoint, str):
            self.description: str | None = endpoint
            self._endpoint: IStreamServerEndpoint | None = None
        elif IStreamServerEndpoint.providedBy(endpoint):
            self.description = None
            self._endpoint = endpoint
        else:
            raise TypeError(
                f"Endpoint() takes a description string or an IStreamServerEndpoint, "
                f"not {type(endpoint).__name__}"
            )

    def __repr__(self) -> str:
        shown = self.description if self.description is not None else self._endpoint
        return f"Endpoint({shown!r})"

    def resolve(self, reactor: Any = None) -> IStreamServerEndpoint:
        """The endpoint object, parsing the description (once) if need be.

        Error handling:
            ``ValueError`` naming the description if Twisted cannot parse it.
        """
        if self._endpoint is None:
            assert self.description is not None
            # Imported here: it loads pyOpenSSL and cryptography (some 18 MB),
            # which every process importing txsocketserver would pay for,
            # forking workers included.
            from twisted.internet.endpoints import serverFromString

            try:
                self._endpoint = serverFromString(
                    reactor or _reactor.get_reactor(), self.description
                )
            except Exception as exc:
                missing = exc.name if isinstance(exc, ImportError) else None
                if missing and missing.partition(".")[0] in TLS_EXTRA_MODULES:
                    raise ValueError(
                        f"endpoint description {self.description!r} needs TLS support "
                        f"({missing} is not installed): pip install 'txsocketserver[tls]'"
                    ) from exc
                raise ValueError(f"bad endpoint description {self.description!r}: {exc}") from exc
        return self._endpoint


class ListeningSocket(NamedTuple):
    """An endpoint that is nothing but a listening socket, which a stream
    server makes and accepts itself (see ``TCPServer.__init__``)."""

    family: socket.AddressFamily
    # (host, port), or a Unix socket path.
    address: Any
    backlog: int
    # For ssl: descriptions: what each accepted socket is wrapped with.
    tls: ssl.SSLContext | None = None
    # The permissions Twisted gives a Unix socket's file.
    unix_mode: int | None = None
    # unix: with lockfile=1 (Twisted's default): a PATH.lock file guards the
    # socket file, and a stale socket file is removed under it.
    unix_lock: bool = False


def listening_socket(endpoint: Endpoint) -> ListeningSocket | None:
    """How to serve *endpoint* on a listening socket of the server's own, or
    ``None`` if only Twisted can serve it.

    Twisted's ``tcp:``, ``tcp6:`` and ``unix:`` endpoints are plain
    listening sockets, and an ``ssl:`` description is
    one plus TLS options: a stream server binds and accepts them itself, so
    handlers get real sockets (``ssl.SSLSocket`` objects for ``ssl:``, see
    ``_tls``) with no thread hop per read and write.  Subclasses and every
    other endpoint (``haproxy:``, ``systemd:``, an ``SSL4ServerEndpoint``
    object with its own TLS configuration...) go through Twisted
    (:class:`EndpointListener`).

    Error handling:
        ``ValueError`` as for :meth:`Endpoint.resolve`.
    """
    from twisted.internet import abstract, endpoints

    resolved = endpoint.resolve()
    kind = type(resolved)
    # The endpoints' attributes are private, but have kept these names since
    # Twisted 10; any other type simply takes the Twisted path.
    if kind is endpoints.UNIXServerEndpoint:
        return ListeningSocket(
            socket.AF_UNIX,
            resolved._address,  # type: ignore[attr-defined]
            resolved._backlog,  # type: ignore[attr-defined]
            unix_mode=resolved._mode,  # type: ignore[attr-defined]
            unix_lock=bool(resolved._wantPID),  # type: ignore[attr-defined]
        )
    tls = None
    if kind is endpoints.SSL4ServerEndpoint:
        if endpoint.description is None:
            return None
        from txsocketserver import _tls

        tls = _tls.server_context(endpoint.description)
        if tls is None:
            return None
    elif kind not in (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint):
        return None
    interface = resolved._interface  # type: ignore[attr-defined]
    ipv6 = kind is endpoints.TCP6ServerEndpoint or abstract.isIPv6Address(interface)
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    host = interface or ("::" if ipv6 else "0.0.0.0")
    port = resolved._port  # type: ignore[attr-defined]
    return ListeningSocket(family, (host, port), resolved._backlog, tls)  # type: ignore[attr-defined]


def as_endpoint(server_address: Any, address_family: int) -> Endpoint | None:
    """The endpoint ``server_address`` names, or ``None`` for a socket address.

    An :class:`Endpoint` always is one; a ``str`` with a ``":"`` is one for IP
    servers, whose socket addresses are tuples (a Unix server's ``str`` is a path).
    """
    if isinstance(server_address, Endpoint):
        return server_address
    if (
        isinstance(server_address, str)
        and ":" in server_address
        and address_family in (socket.AF_INET, socket.AF_INET6)
    ):
        return Endpoint(server_address)
    return None


class _TrackedProtocol(TransportSocketProtocol):
    """A ``TransportSocketProtocol`` that tells its listener when it is gone."""

    listener: EndpointListener

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            self.listener._connection_lost(self)


class _ListenerFactory(TransportSocketFactory):
    def __init__(self, listener: EndpointListener, reactor: Any) -> None:
        super().__init__(listener._on_connection, reactor=reactor)
        self._listener = listener
        self._reactor = reactor

    def buildProtocol(self, addr: Any) -> _TrackedProtocol:
        protocol = _TrackedProtocol(self._listener._on_connection, reactor=self._reactor)
        protocol.factory = self
        protocol.listener = self._listener
        self._listener._connection_made(protocol)
        return protocol


@implementer(IRequestReadiness)
class EndpointReadiness:
    """Readiness of an endpoint server: a connection waits in the listener's queue."""

    def __init__(self, listener: EndpointListener) -> None:
        self._listener = listener
        self.wakes = 0  # wake() calls not yet consumed by wait(); under the listener's lock
        # A port opened before any reactor ran (the first server of a blocking
        # program) accepts only once one runs.
        _reactor.running_reactor()

    def wait(self, timeout: float | None) -> bool:
        return self._listener._wait(self, timeout)

    def wake(self) -> None:
        self._listener._wake(self)

    def close(self) -> None:
        # Nothing is registered with the reactor on our behalf: the port keeps
        # feeding the queue until the server closes.
        pass


class EndpointListener:
    """The endpoint side of a stream server: a listening port and its queue.

    Args:
        endpoint: where to listen.
        backlog: connections queued for ``get_request()`` before the port stops
            accepting (the server's ``request_queue_size``).
    """

    def __init__(self, endpoint: Endpoint, *, backlog: int) -> None:
        self.endpoint = endpoint
        self._backlog = max(1, backlog)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[TransportSocket, SocketAddress]] = collections.deque()
        self._port: IListeningPort | None = None
        self._accepting_paused = False  # port.stopReading() in effect; reactor thread
        self._stopped = False  # no new connections are wanted
        self._closed = False  # get_request() fails from now on
        # The socketpair behind fileno(), made on first use: its read end holds
        # one byte per queued connection.
        self._notify: tuple[socket.socket, socket.socket] | None = None
        self.host: SocketAddress | None = None
        self.family: socket.AddressFamily | None = None
        # Every connection not yet lost (reactor thread adds and removes).
        self._connections: set[_TrackedProtocol] = set()

    # -- listening -------------------------------------------------------------------

    def listen(self) -> None:
        """Start listening, from whichever thread constructs the server.

        With the reactor running in another thread (the blocking world, once a
        server has served), the port is opened there and this call waits.  With
        no reactor running (a ``.tac`` file, a ``twistd`` plugin, the first
        server of a blocking program) it is opened right here, as ``twistd``
        itself opens ports before it runs the reactor.

        Error handling:
            The endpoint's error (``CannotListenError`` for a port in use...)
            is raised; ``RuntimeError`` if the endpoint only listens
            asynchronously and this thread cannot wait for it (see
            :func:`txsocketserver.start_server`).
        """
        reactor = _reactor.get_reactor()
        if reactor.running and not _reactor.in_reactor_thread():
            _reactor.call_in_reactor(self.listen_deferred)
            return
        outcome: list[Any] = []
        self.listen_deferred().addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(
                f"{self.endpoint!r} does not start listening at once, and this thread "
                "cannot wait for the reactor. Create the server with "
                "bind_and_activate=False and start it with txsocketserver.start_server()."
            )
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()

    def listen_deferred(self) -> Deferred[None]:
        """Start listening; on the reactor thread (or with no reactor running)."""
        if self._port is not None or self._stopped:
            raise RuntimeError(f"{self.endpoint!r} was already listened on")
        reactor = _reactor.get_reactor()
        factory = _ListenerFactory(self, reactor)
        deferred = maybeDeferred(self.endpoint.resolve(reactor).listen, factory)
        return deferred.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        address = port.getHost()
        self.host = socket_address(address)
        self.family = socket_family(address)

    @property
    def listening(self) -> bool:
        return self._port is not None

    # -- the queue (reactor thread in, serving thread out) -----------------------------

    def _connection_made(self, protocol: _TrackedProtocol) -> None:
        with self._lock:
            self._connections.add(protocol)

    def _connection_lost(self, protocol: _TrackedProtocol) -> None:
        with self._changed:
            self._connections.discard(protocol)
            self._changed.notify_all()

    def _closing_connections(self) -> bool:
        """Whether a connection its handler closed is still sending (lock held)."""
        # Reads the bridge's flags without its lock: each is a bool set once.
        return any(p._bridge.closed for p in self._connections)

    def _on_connection(self, transport_socket: TransportSocket, address: SocketAddress) -> None:
        with self._lock:
            if self._stopped:
                accepted = False
            else:
                accepted = True
                self._queue.append((transport_socket, address))
                if self._notify is not None:
                    self._notify[1].send(b"\0")
                self._changed.notify()
                pause = len(self._queue) >= self._backlog and not self._accepting_paused
                if pause:
                    self._accepting_paused = True
        if not accepted:
            transport_socket.close()
        elif pause:
            stop_reading = getattr(self._port, "stopReading", None)
            if stop_reading is not None:
                stop_reading()

    def take(self) -> tuple[TransportSocket, SocketAddress]:
        """The next queued connection (serving thread).

        Error handling:
            ``OSError(EBADF)`` once closed; ``BlockingIOError`` if none is queued.
        """
        with self._lock:
            if self._closed:
                raise bad_file_descriptor("the server was closed")
            if not self._queue:
                raise BlockingIOError(errno.EAGAIN, "no connection is queued")
            request = self._queue.popleft()
            if self._notify is not None:
                self._notify[0].recv(1)
            resume = self._accepting_paused and len(self._queue) < self._backlog
            if resume:
                self._accepting_paused = False
        if resume:
            _reactor.call_soon(self._resume_accepting)
        return request

    def _resume_accepting(self) -> None:
        port = self._port
        if port is not None and not self._stopped and not self._accepting_paused:
            start_reading = getattr(port, "startReading", None)
            if start_reading is not None:
                start_reading()

    def _wait(self, readiness: EndpointReadiness, timeout: float | None) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._closed or readiness.wakes, timeout)
            if self._closed:
                raise bad_file_descriptor("the server was closed while serving")
            if readiness.wakes:
                readiness.wakes -= 1
                return False
            return bool(self._queue)

    def _wake(self, readiness: EndpointReadiness) -> None:
        with self._changed:
            readiness.wakes += 1
            self._changed.notify_all()

    def readiness(self) -> EndpointReadiness:
        return EndpointReadiness(self)

    def fileno(self) -> int:
        """A descriptor that is readable while a connection is queued.

        Twisted, not the server, accepts on the listening socket, so that
        socket says nothing about whether ``get_request()`` would block; this
        one does, which is what a ``selectors`` loop calling
        ``handle_request()`` needs.
        """
        with self._lock:
            if self._closed:
                raise bad_file_descriptor("the server was closed")
            if self._notify is None:
                reader, writer = socket.socketpair()
                reader.setblocking(False)
                writer.setblocking(False)
                if self._queue:
                    writer.send(b"\0" * len(self._queue))
                self._notify = (reader, writer)
            return self._notify[0].fileno()

    # -- ending ------------------------------------------------------------------------

    def stop_listening(self) -> None:
        """Stop accepting and close the queued connections; ``get_request`` keeps
        failing with ``BlockingIOError`` until :meth:`close`.  Any thread;
        waits for the port to close unless called on the reactor thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            queued = list(self._queue)
            self._queue.clear()
            if self._notify is not None:
                # Forget the bytes standing for the connections dropped.
                self._drain_notify()
        for transport_socket, _ in queued:
            transport_socket.close()
        port, self._port = self._port, None
        if port is None:
            return
        reactor = _reactor.get_reactor()
        if _reactor.in_reactor_thread():
            port.stopListening()
        elif reactor.running:
            _reactor.call_in_reactor(port.stopListening)
        else:
            # Listening happened with no reactor running and nothing ran it
            # since: only a running reactor closes a port, so start ours.
            _reactor.running_reactor()
            _reactor.call_in_reactor(port.stopListening)

    def _drain_notify(self) -> None:
        assert self._notify is not None
        try:
            while self._notify[0].recv(4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Stop listening, close queued connections, fail ``get_request`` and
        any ``wait`` from now on.  Idempotent; any thread.

        Off the reactor thread, also waits (at most ``CLOSE_FLUSH_TIMEOUT``
        seconds) until the connections whose handlers closed them have sent
        everything and closed.
        """
        self.stop_listening()
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            notify, self._notify = self._notify, None
            if not _reactor.in_reactor_thread() and _reactor.get_reactor().running:
                # Nothing is lost: what handlers wrote before closing reaches
                # the clients even if the process exits right after this.
                self._changed.wait_for(
                    lambda: not self._closing_connections(), CLOSE_FLUSH_TIMEOUT
                )
        if notify is not None:
            for end in notify:
                end.close()


__all__ = ["Endpoint", "EndpointListener", "EndpointReadiness", "as_endpoint"]
