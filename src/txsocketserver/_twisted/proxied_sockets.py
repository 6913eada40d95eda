# -*- test-case-name: tests.test_forking_proxy -*-
"""A forking server behind ``haproxy:``: the PROXY header read here, the real socket to the child.

A forking server hands each child the accepted OS socket, and a connection
that Twisted's port accepted is a transport in the serving process, which
cannot cross.  So a ``ForkingMixIn`` server behind ``haproxy:`` gets this
listener (chosen by ``strategies.strategies_for``): it listens on the
server's own socket (the endpoint that ``haproxy:`` wraps: ``tcp:``,
``tcp6:``, ``unix:``, or an adopted descriptor, ``systemd:`` and ``fd:``,
as a ``--workers`` worker has it), and the reactor accepts and runs each
connection's header stage (``proxy_stage.ProxyHeaderStage``: the trust
list, the deadline, the log lines, the lifecycle's refusals) over the
socket itself, reading *exactly* the header:

* each time the socket is readable, ``recv(MSG_PEEK)`` looks at what has
  arrived; while that is not a whole header, every byte of it belongs to the
  header (a v1 line ends at its CRLF, a v2 header is at least 16 bytes and
  says its length), so it is read;
* once it is whole, only the header's remaining bytes are read: what the
  client sent after it stays in the kernel's buffer, for the child.

The socket, blocking again, then waits in this listener's queue with the
address the header names, for ``get_request()``; ``verify_request()`` sees
that address, and ``process_request()`` hands the socket to a child as any
forking server's.  Behind ``haproxy:ssl:`` the server's connection security
is ``tls.TLSSecurity``, as for ``ssl:``: the socket is wrapped without I/O,
and the child does the handshake (``_forking/tls.py``).

The queue is the listen backlog, as ``endpoints.EndpointListener``'s: a
connection holds one of ``request_queue_size`` slots from accept until
``get_request()`` takes it; at the cap the reactor stops accepting (the
kernel's backlog holds the rest), and a connection still in its header
after :data:`~txsocketserver._twisted.endpoints.HEADER_TIMEOUT_WHEN_FULL`
seconds is closed to make room.

The acceptor and the header readers belong to the reactor thread; the queue
is shared under one lock; ``accept`` runs in the serving thread; ``close``
may be called from any thread.
"""

from __future__ import annotations

import collections
import errno
import socket
import threading
import time
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from txsocketserver._core import lifecycle
from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.endpoints import DEFAULT_HEADER_TIMEOUT, HEADER_TIMEOUT_WHEN_FULL
from txsocketserver._twisted.interfaces import IListener, IRequestReadiness
from txsocketserver._twisted.proxy_protocol import (
    DEFAULT_TRUSTED_PROXIES,
    V2_FIXED_LENGTH,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    parse_header,
)
from txsocketserver._twisted.proxy_stage import ProxyHeaderPolicy, ProxyHeaderStage

_log = Logger(namespace="txsocketserver")

#: The most a PROXY header can be (a v2 header: 16 bytes and a 16-bit length).
MAX_HEADER_LENGTH = V2_FIXED_LENGTH + 0xFFFF

# accept() errors that say the process or system is out of something: the
# acceptor pauses (as a socket server's loop does) instead of spinning.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_BACKOFF = 0.05


def adopted_descriptor(endpoint: Any) -> int | None:
    """The descriptor of an ``AdoptedStreamServerEndpoint`` (``systemd:``,
    ``fd:``), or ``None`` for any other endpoint (its public ``fileno``)."""
    from twisted.internet.endpoints import AdoptedStreamServerEndpoint

    if type(endpoint) is not AdoptedStreamServerEndpoint:
        return None
    return int(endpoint.fileno)


def serves(endpoint: Any) -> bool:
    """Whether a forking server can serve *endpoint* (an ``endpoints.Endpoint``)
    with this module: ``haproxy:`` in front of a listening socket (``tcp:``,
    ``tcp6:``, ``unix:``, an adopted descriptor), not of TLS that Twisted
    carries under the header."""
    from twisted.internet import endpoints as twisted_endpoints

    from txsocketserver._twisted import endpoints

    inner = endpoints.proxy_protocol_endpoint(endpoint.resolve())
    return type(inner) in (
        twisted_endpoints.TCP4ServerEndpoint,
        twisted_endpoints.TCP6ServerEndpoint,
        twisted_endpoints.UNIXServerEndpoint,
        twisted_endpoints.AdoptedStreamServerEndpoint,
    )


def strategies(
    server: Any, serving: Any, plain: Any, settings: dict[str, Any], endpoint: Any
) -> Any:
    """The strategies of a forking *server* behind ``haproxy:`` (*endpoint*,
    an ``endpoints.Endpoint``): this module's listener on the server's own
    socket, and TLS in the child for ``haproxy:ssl:``.

    Error handling:
        ``ValueError`` when ``haproxy:`` wraps an endpoint that is not a
        listening socket (``tcp:``, ``tcp6:``, ``unix:``, ``systemd:``, ``fd:``).
    """
    from twisted.internet import abstract
    from twisted.internet import endpoints as twisted_endpoints

    from txsocketserver._twisted import compat, endpoints
    from txsocketserver._twisted.listeners import SocketListener
    from txsocketserver._twisted.strategies import Strategies

    inner = endpoints.proxy_protocol_endpoint(endpoint.resolve())
    if not serves(endpoint):
        raise ValueError(
            f"{endpoint!r}: a forking server behind haproxy: needs it to wrap a "
            "listening socket (tcp:, tcp6:, unix:, systemd:, fd:, or ssl: with the "
            f"TLS after the header), not {type(inner).__name__}"
        )
    backlog = endpoints.endpoint_backlog(endpoint) or server.request_queue_size
    options = endpoint._listener_options
    adopted = adopted_descriptor(inner)
    unix = compat.unix_parameters(inner)
    tcp = compat.tcp_parameters(inner)
    if adopted is not None:
        sock = socket.socket(fileno=adopted)
        settings.update(socket=sock, server_address=sock.getsockname(), address_family=sock.family)
        socket_listener = None
    elif unix is not None:
        settings.update(
            socket=socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
            server_address=unix.address,
            address_family=socket.AF_UNIX,
        )
        socket_listener = SocketListener(
            server,
            unix_mode=unix.mode,
            unix_lock=unix.lockfile,
            from_endpoint=True,
            options=options,
        )
    elif tcp is not None:
        ipv6 = type(inner) is twisted_endpoints.TCP6ServerEndpoint or abstract.isIPv6Address(
            tcp.interface
        )
        family = socket.AF_INET6 if ipv6 else socket.AF_INET
        settings.update(
            socket=socket.socket(family, socket.SOCK_STREAM),
            server_address=(tcp.interface or ("::" if ipv6 else "0.0.0.0"), tcp.port),
            address_family=family,
        )
        socket_listener = SocketListener(
            server, reuse_address=True, from_endpoint=True, options=options
        )
    else:
        assert tcp is not None, inner
    settings["request_queue_size"] = backlog
    security: Any = plain
    if endpoint._tls_config is not None:
        from txsocketserver._twisted.tls import TLSSecurity

        security = TLSSecurity(endpoint._tls_config)
    listener = ProxiedSocketListener(server, socket_listener, backlog=backlog)
    return Strategies(serving, listener, security, settings)


@implementer(IListener)
class ProxiedSocketListener:
    """The listener of a forking server behind ``haproxy:`` (see the module).

    Args:
        server: the server it listens for (its ``socket``, its
            ``trusted_proxies`` and ``header_timeout``, read as each
            connection arrives).
        socket_listener: what binds, listens and closes the server's socket
            (a ``listeners.SocketListener``), or ``None`` for a socket that
            was adopted listening.
        backlog: connections accepted and not yet taken by ``get_request()``
            before the reactor stops accepting.
    """

    #: The reactor accepts, not the serving loop: accepting may stop at any time.
    stops_at_once = True

    def __init__(self, server: Any, socket_listener: Any, *, backlog: int) -> None:
        self._server = server
        self._socket_listener = socket_listener
        self._backlog = max(1, backlog)
        self._trusted: TrustedProxies | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[socket.socket, Any, Any]] = collections.deque()
        # Connections in their header stage, oldest first (reactor thread
        # adds; removed under the lock).
        self._pending: dict[_HeaderReader, float] = {}
        # What the last accept() returned: its fd and lifecycle record.
        self._taken: tuple[int, Any] = (-1, None)
        self._acceptor: _Acceptor | None = None  # reading the listening socket
        self._accepting_paused = False
        self._make_room_call: Any = None
        self._stopped = False  # no new connections are wanted
        self._closed = False  # get_request() fails from now on
        self._notify: tuple[socket.socket, socket.socket] | None = None
        self._accept_failures = 0

    # -- IListener -----------------------------------------------------------------------

    def bind(self) -> None:
        if self._socket_listener is not None:
            self._socket_listener.bind()

    def activate(self) -> None:
        if self._socket_listener is not None:
            self._socket_listener.activate()

    def start_listening(self) -> Any:
        if self._socket_listener is None:
            return None
        return self._socket_listener.start_listening()

    def accept(self) -> tuple[Any, Any]:
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the server was closed")
            if not self._queue:
                raise BlockingIOError(errno.EAGAIN, "no connection is queued")
            sock, address, record = self._queue.popleft()
            self._taken = (sock.fileno(), record)
            if self._notify is not None:
                self._notify[0].recv(1)
            self._changed.notify_all()
            resume = self._accepting_paused and self._load() < self._backlog
        if resume:
            _reactor.call_soon(self._resume_accepting)
        return sock, address

    def take_record(self, request: Any) -> Any:
        """The lifecycle record made at accept for *request* (what
        ``get_request()`` returned last, TLS-wrapped or not), or ``None``."""
        fd, record = self._taken
        self._taken = (-1, None)
        try:
            same = request.fileno() == fd
        except (AttributeError, OSError):
            same = False
        return record if same else None

    def fileno(self) -> int:
        """A descriptor readable while a connection is queued (the listening
        socket says nothing of that: the reactor accepts)."""
        self._start()
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the server was closed")
            if self._notify is None:
                reader, writer = socket.socketpair()
                reader.setblocking(False)
                writer.setblocking(False)
                if self._queue:
                    writer.send(b"\0" * len(self._queue))
                self._notify = (reader, writer)
            return self._notify[0].fileno()

    def readiness(self) -> IRequestReadiness:
        self._start()
        return ProxiedSocketReadiness(self)

    def stop_accepting(self) -> None:
        """Stop accepting; the connections in their header stage and the
        queued ones stay for the serving loop.

        The listening socket stays open until :meth:`close`: it is part of
        the server's state that a template gets with each request.  A socket
        of the server's own is shut down, which stops the kernel listening
        for every process that holds it (a template's copy too); an adopted
        one (a ``--workers`` worker's) is shared with the other workers,
        which go on accepting from it.
        """
        self._on_reactor(self._stop_acceptor)
        if self._socket_listener is not None:
            try:
                self._server.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not every system stops listening so (it closes in close())

    def wait_accepted_taken(self, timeout: float) -> bool:
        with self._changed:
            return bool(self._changed.wait_for(lambda: self._closed or not self._load(), timeout))

    def close(self) -> None:
        with self._changed:
            already = self._closed
            self._stopped = self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
            notify, self._notify = self._notify, None
        if not already:
            self._on_reactor(self._stop_all)
        for sock, _, record in queued:
            sock.close()
            if record is not None:
                lifecycle.refused(record, lifecycle.STOPPING)
                lifecycle.ended(record)
        if notify is not None:
            for end in notify:
                end.close()
        if self._socket_listener is not None:
            self._socket_listener.close()
        else:
            self._server.socket.close()
        _reactor.release(self)

    # -- the reactor side ------------------------------------------------------------------

    def _start(self) -> None:
        """Begin accepting on the reactor (once; from the first serving call)."""
        if self._acceptor is not None or self._closed:
            return
        _reactor.hold(self)
        self._acceptor = _Acceptor(self, self._server.socket)
        _reactor.call_soon(self._resume_accepting)

    def _on_reactor(self, function: Any) -> None:
        if self._acceptor is None:
            function()  # the reactor never saw this listener
        elif _reactor.in_reactor_thread() or not _reactor.get_reactor().running:
            function()
        else:
            _reactor.call_in_reactor(function)

    def _stop_acceptor(self) -> None:
        acceptor = self._acceptor
        if acceptor is not None:
            acceptor.stop()
        self._accepting_paused = True

    def _stop_all(self) -> None:
        self._stop_acceptor()
        call, self._make_room_call = self._make_room_call, None
        if call is not None and call.active():
            call.cancel()
        for reader in list(self._pending):
            reader.stage.evict("the server is stopping", level="info", refusal=lifecycle.STOPPING)

    def _resume_accepting(self) -> None:
        acceptor = self._acceptor
        if acceptor is None or self._stopped:
            return
        with self._lock:
            full = self._load() >= self._backlog
            self._accepting_paused = full
        if not full:
            acceptor.start()

    def _load(self) -> int:
        """Connections holding a slot: queued or in their header stage (lock held)."""
        return len(self._queue) + len(self._pending)

    def _free_slots(self) -> int:
        with self._lock:
            return self._backlog - self._load()

    def _accepted(self, sock: socket.socket, peer: Any) -> None:
        """A connection was accepted (reactor thread): begin its header stage."""
        server = self._server
        record = lifecycle.accepted(server, peer) if server._observers else None
        entries = tuple(getattr(server, "trusted_proxies", DEFAULT_TRUSTED_PROXIES))
        if self._trusted is None or self._trusted.entries != entries:
            self._trusted = TrustedProxies(entries)
        timeout = getattr(server, "header_timeout", DEFAULT_HEADER_TIMEOUT)
        reader = _HeaderReader(self, sock, peer, record)
        with self._lock:
            self._pending[reader] = time.monotonic()
        reader.begin(ProxyHeaderPolicy(self._trusted, timeout), _reactor.get_reactor())

    def _admitted(self, reader: _HeaderReader, address: Any) -> None:
        """*reader*'s header is read: queue its socket (reactor thread)."""
        with self._changed:
            self._pending.pop(reader, None)
            stopped = self._stopped
            if not stopped:
                self._queue.append((reader.sock, address, reader.record))
                if self._notify is not None:
                    self._notify[1].send(b"\0")
                self._changed.notify_all()
        if stopped:
            reader.sock.close()
            if reader.record is not None:
                lifecycle.refused(reader.record, lifecycle.STOPPING)
                lifecycle.ended(reader.record)

    def _lost(self, reader: _HeaderReader) -> None:
        """*reader*'s connection ended in its header stage (reactor thread)."""
        with self._changed:
            self._pending.pop(reader, None)
            self._changed.notify_all()
        if reader.record is not None:
            lifecycle.ended(reader.record)
        if self._accepting_paused and not self._stopped:
            self._resume_accepting()

    def _full(self) -> None:
        """Every slot is taken (reactor thread): stop accepting, and make room
        among the connections that have had their chance at a header."""
        self._accepting_paused = True
        if self._acceptor is not None:
            self._acceptor.stop()
        if self._make_room_call is not None or not self._pending:
            return
        oldest = next(iter(self._pending.values()))
        delay = max(0.0, oldest + HEADER_TIMEOUT_WHEN_FULL - time.monotonic())
        self._make_room_call = _reactor.get_reactor().callLater(delay, self._make_room)

    def _make_room(self) -> None:
        self._make_room_call = None
        if not self._accepting_paused or self._stopped:
            return
        limit = time.monotonic() - HEADER_TIMEOUT_WHEN_FULL
        with self._lock:
            stale = [r for r, accepted in self._pending.items() if accepted <= limit]
        for reader in stale:
            reader.stage.evict(
                f"no complete PROXY header within {HEADER_TIMEOUT_WHEN_FULL}s "
                "while every slot was taken",
                refusal=lifecycle.MAX_CONNECTIONS,
            )
        if self._accepting_paused and self._free_slots() <= 0:
            self._full()

    def _accept_failed(self, error: OSError) -> None:
        """``accept()`` ran out of a resource: log once per episode, pause."""
        if not self._accept_failures:
            _log.warn(
                "accept() failed: {error}; pausing {seconds}s between attempts",
                error=error,
                seconds=_RESOURCE_BACKOFF,
            )
        self._accept_failures += 1
        if self._acceptor is not None:
            self._acceptor.stop()
        _reactor.get_reactor().callLater(_RESOURCE_BACKOFF, self._resume_accepting)

    def _accept_recovered(self) -> None:
        _log.warn(
            "accept() works again after {count} failed attempts", count=self._accept_failures
        )
        self._accept_failures = 0

    # -- the serving thread's wait -----------------------------------------------------------

    def _wait(self, readiness: ProxiedSocketReadiness, timeout: float | None) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: self._queue or self._closed or readiness.wakes, timeout)
            if self._closed:
                raise OSError(errno.EBADF, "the server was closed while serving")
            if readiness.wakes:
                readiness.wakes -= 1
                return False
            return bool(self._queue)

    def _wake(self, readiness: ProxiedSocketReadiness) -> None:
        with self._changed:
            readiness.wakes += 1
            self._changed.notify_all()


@implementer(IRequestReadiness)
class ProxiedSocketReadiness:
    """Readiness of a :class:`ProxiedSocketListener`: a connection is queued."""

    def __init__(self, listener: ProxiedSocketListener) -> None:
        self._listener = listener
        self.wakes = 0  # wake() calls not yet consumed by wait(); under the listener's lock

    def wait(self, timeout: float | None) -> bool:
        return self._listener._wait(self, timeout)

    def wake(self) -> None:
        self._listener._wake(self)

    def close(self) -> None:
        # The listener keeps accepting until the server closes.
        pass


@implementer(IReadDescriptor)
class _Acceptor:
    """The reactor's reader of the listening socket: accepts a batch no
    larger than the free slots per readable event."""

    def __init__(self, listener: ProxiedSocketListener, sock: socket.socket) -> None:
        self._listener = listener
        self._sock = sock
        self._reading = False

    def logPrefix(self) -> str:
        return "txsocketserver"

    def fileno(self) -> int:
        return self._sock.fileno()

    def start(self) -> None:
        if not self._reading and self._sock.fileno() != -1:
            self._sock.setblocking(False)
            self._reading = True
            _reactor.get_reactor().addReader(self)

    def stop(self) -> None:
        if self._reading:
            self._reading = False
            _reactor.get_reactor().removeReader(self)

    def doRead(self) -> None:
        listener = self._listener
        free = listener._free_slots()
        for _ in range(max(0, free)):
            try:
                sock, peer = self._sock.accept()
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno in _RESOURCE_ERRNOS:
                    listener._accept_failed(error)
                    return
                if error.errno == errno.ECONNABORTED:
                    continue
                # Whatever else: the reactor would stop watching the socket
                # for good; log it and keep accepting.
                _log.warn("accept() failed: {error}", error=error)
                break
            if listener._accept_failures:
                listener._accept_recovered()
            sock.setblocking(False)
            listener._accepted(sock, peer)
        if listener._free_slots() <= 0:
            listener._full()

    def connectionLost(self, reason: Any) -> None:
        self._reading = False


@implementer(IReadDescriptor)
class _HeaderReader:
    """One connection in its header stage, on the reactor: reads exactly
    its PROXY header (see the module), and is the stage's transport (its
    ``loseConnection`` closes the socket)."""

    def __init__(
        self, listener: ProxiedSocketListener, sock: socket.socket, peer: Any, record: Any
    ) -> None:
        self._listener = listener
        self.sock = sock
        self.peer = peer
        self.record = record
        self.stage: ProxyHeaderStage = None  # type: ignore[assignment]
        self._header = bytearray()  # its bytes read so far
        self._reading = False
        self._done = False

    def begin(self, policy: ProxyHeaderPolicy, reactor: Any) -> None:
        self.stage = ProxyHeaderStage(self, self.peer, policy, reactor, self._over, self.record)
        if self.stage.begin():
            self._reading = True
            reactor.addReader(self)

    def logPrefix(self) -> str:
        return "txsocketserver"

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        sock = self.sock
        try:
            seen = sock.recv(MAX_HEADER_LENGTH, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self.stage.peer_ended("was reset")
            self._close()
            return
        if not seen:
            self.stage.peer_ended("closed")
            self._close()
            return
        try:
            header = parse_header(self._header + seen)
        except ProxyHeaderError:
            header = None
        # While the header is not whole, every byte seen is the header's.
        wanted = len(seen) if header is None else header.length - len(self._header)
        try:
            taken = sock.recv(wanted)
        except OSError:
            self.stage.peer_ended("was reset")
            self._close()
            return
        self._header += taken
        self.stage.feed(taken)

    def _over(self, header: ProxyHeader | None) -> None:
        """The stage is over, the header read: hand the socket on."""
        self._stop_reading()
        self._done = True
        address = self.peer
        if header is not None and header.family is not None:
            address = header.source
        # Blocking again, as socket.accept() would have made it.
        self.sock.settimeout(socket.getdefaulttimeout())
        self._listener._admitted(self, address)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            _reactor.get_reactor().removeReader(self)

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        self._stop_reading()
        self.sock.close()
        self._listener._lost(self)

    # What the stage calls on its transport.
    loseConnection = _close
    abortConnection = _close

    def connectionLost(self, reason: Any) -> None:
        self._reading = False
        if not self._done:
            self.stage.connection_lost(reason)
            self._close()


__all__ = [
    "MAX_HEADER_LENGTH",
    "ProxiedSocketListener",
    "ProxiedSocketReadiness",
    "serves",
    "strategies",
]
