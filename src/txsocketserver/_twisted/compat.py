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

    if getattr(transport, "TLS", False) is True:
        # A TCP transport that startTLS turned into TLS: its
        # loseWriteConnection would shut the TCP stream under the TLS one.
        return None
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


def stream_server_transport(unix: bool) -> Any:
    """The transport class of a connection a TCP (or, *unix*, Unix) port
    accepted: ``tcp.Server``/``unix.Server``, which take ``(socket, protocol,
    client_address, server, session_number, reactor)`` since Twisted 8 (a
    server of ``None`` is what ``adoptStreamConnection`` passes too).  The
    ``tcp`` and ``unix`` modules are not Twisted's public API."""
    if unix:
        from twisted.internet import unix as unix_module

        return unix_module.Server
    from twisted.internet import tcp

    return tcp.Server


def nothing_queued(transport: Any) -> bool:
    """Whether a ``tcp``/``unix`` transport holds no bytes (nor, on Unix,
    descriptors) to send: its ``dataBuffer``, the private ``_tempDataBuffer``
    and ``_sendmsgQueue``.  Written to serve as a method of a transport class
    (``adopted_transport``): one call on every write."""
    return not (
        transport.dataBuffer
        or transport._tempDataBuffer
        or getattr(transport, "_sendmsgQueue", None)
    )


def can_send_now(transport: Any) -> bool:
    """Whether a ``write()`` on a ``tcp``/``unix`` transport may go to the
    socket at once: connected, its write side not shut (the private
    ``_writeDisconnected``), nothing queued before it (:func:`nothing_queued`).
    Written to serve as a method of a transport class: one call per write."""
    return bool(
        transport.connected
        and not transport._writeDisconnected
        and not (
            transport.dataBuffer
            or transport._tempDataBuffer
            or getattr(transport, "_sendmsgQueue", None)
        )
    )


def shared_transport_attributes(log_prefix: str, representation: str) -> dict[str, Any]:
    """Class attributes for a subclass of ``tcp.Server``/``unix.Server`` that
    replace two strings their ``__init__`` keeps per connection: ``logstr``
    (the log prefix, formatted per connection, which ``logPrefix()``
    returns) and ``repstr`` (what ``__repr__`` returns).  Both are
    attributes of Twisted's private ``tcp.Connection``; ``logstr`` becomes a
    data descriptor, so that Twisted's assignment of it is ignored.

    (``fileno``, the socket's bound method, stays per connection: the reactor
    calls it for every event, and a descriptor would cost more per event than
    the 72 bytes it saves.)"""

    def ignore(transport: Any, value: Any = None) -> None:
        pass

    def log_prefix_method(transport: Any) -> str:
        return log_prefix

    return {
        "logstr": property(lambda transport: log_prefix, ignore, ignore),
        "logPrefix": log_prefix_method,
        "repstr": representation,
    }


def disconnector(reactor: Any) -> Any:
    """The reactor's ``_disconnectSelectable(selectable, why, isRead)``, which
    ends a transport whose ``doRead`` returned a reason as the reactor itself
    would; ``None`` for a reactor without it."""
    return getattr(reactor, "_disconnectSelectable", None)


def reap_process(transport: Any) -> None:
    """Reap the process behind a ``spawnProcess`` transport if it has exited.

    Twisted reaps a spawned process on ``SIGCHLD``, which a reactor run with
    ``installSignalHandlers=False`` (the blocking world's) never gets; it
    then tries once, when the process's pipes close, which can be a moment
    before the process has finished exiting.  ``Process.reapProcess()``
    (``_BaseProcess``, not part of ``IProcessTransport``) tries again: it
    calls ``processEnded`` once the process has exited, and nothing before.
    Reactor thread only.
    """
    transport.reapProcess()


def widen_listen_backlog(port: Any, backlog: int) -> bool:
    """Let the kernel queue up to *backlog* connections for *port* (a
    listening port of Twisted's: TCP or UNIX), by calling ``listen()`` again
    on its socket, ``Port.socket``; return whether it could.  Twisted takes
    the backlog only when the port is made (``listenTCP(backlog=50)``)."""
    import socket

    sock = getattr(port, "socket", None)
    if not isinstance(sock, socket.socket) or sock.fileno() == -1:
        return False
    sock.listen(backlog)
    return True


# -- the blocking world's reactor thread (``_twisted.reactor``) ------------------------------
#
# The thread runs the global reactor with ``run()`` and ends with ``crash()``,
# which leaves a reactor that ``run()`` starts again (trial runs and crashes
# it for every test).  Only a ``stop()`` makes a reactor refuse to run again.


def reactor_was_stopped(reactor: Any) -> bool:
    """Whether *reactor* ran and was stopped (``run()`` would raise
    ``ReactorNotRestartable``): reads ``ReactorBase._startedBefore`` and
    ``_started``."""
    return bool(getattr(reactor, "_startedBefore", False)) and not getattr(
        reactor, "_started", False
    )


def make_runnable_again(reactor: Any) -> None:
    """Let a reactor that ran and was stopped (``react()``, ``reactor.run()``
    then ``stop()``) be run again, by the blocking world's thread.

    Twisted refuses a second ``run()`` for what a stop used up: the flag
    ``_startedBefore``, and the two shutdown triggers ``ReactorBase.__init__``
    adds (``crash`` and ``disconnectAll``, consumed by the shutdown event),
    which a later ``stop()`` needs to end the loop.  The rest of a stopped
    reactor (its waker, its delayed calls, the ``during startup`` trigger that
    ``crash()`` re-adds) is as after a ``crash()``.
    """
    if not reactor_was_stopped(reactor):
        return
    reactor._startedBefore = False
    reactor.addSystemEventTrigger("during", "shutdown", reactor.crash)
    reactor.addSystemEventTrigger("during", "shutdown", reactor.disconnectAll)


#: What :func:`reactor_work` says.
IDLE, CLOSING, BUSY = "idle", "closing", "busy"


def reactor_work(reactor: Any) -> str:
    """What *reactor* still has in hand, asked on its thread.

    ``IDLE``: no descriptor but its own (``ReactorBase._internalReaders``:
    the waker), no child process to reap (``process.reapProcessHandlers``),
    no busy thread in its pool, no delayed call due.  ``CLOSING``: only
    descriptors that are closing (``disconnecting``: a transport sending its
    last bytes, a port going away) or delayed calls due now (a port's
    ``connectionLost``).  ``BUSY``: anything else.
    """
    from twisted.internet import process

    internal = getattr(reactor, "_internalReaders", None) or {reactor.waker}
    selectables = [s for s in {*reactor.getReaders(), *reactor.getWriters()} if s not in internal]
    pool = getattr(reactor, "threadpool", None)
    if process.reapProcessHandlers or (pool is not None and pool.working):
        return BUSY
    if not all(getattr(s, "disconnecting", False) for s in selectables):
        return BUSY
    now = reactor.seconds()
    if selectables or any(call.getTime() <= now for call in reactor.getDelayedCalls()):
        return CLOSING
    return IDLE


def stop_reactor_thread_pool(reactor: Any) -> None:
    """Stop the reactor's own thread pool, if one was made (``deferToThread``,
    name resolution), joining its threads; the next use makes a new one.

    ``ReactorBase._stopThreadPool`` (what the shutdown event calls, and
    trial's janitor between tests) also removes the pool's startup and
    shutdown triggers and forgets the pool.
    """
    if getattr(reactor, "threadpool", None) is not None:
        reactor._stopThreadPool()


def io_thread() -> Any:
    """The thread Twisted believes runs the reactor (``threadable.ioThread``,
    set by ``run()``; ``isInIOThread()`` compares with it)."""
    from twisted.python import threadable

    return threadable.ioThread


def set_io_thread(ident: Any) -> None:
    """Set what :func:`io_thread` returns: once the blocking world's thread
    has ended, the thread that ran the reactor before it (or ``None``), so
    that a new thread given the old one's identifier is not taken for it."""
    from twisted.python import threadable

    threadable.ioThread = ident


def exclusive_reader(reactor: Any, fd: int) -> bool:
    """Register *fd*, a reader of *reactor* (and not a writer), in the
    reactor's ``epoll`` set again, with ``EPOLLEXCLUSIVE``: its wake-ups are
    then shared with other processes' exclusive waiters, and the new entry
    goes to the back of the file's wait queue (``_workers.exclusive_accept``).

    Twisted's ``EPollReactor`` keeps its set in ``_poller`` and its readers
    and writers in ``_reads`` and ``_writes``; it registers a reader alone
    with ``EPOLLIN``, modifies the entry only to add or drop a writer on the
    same descriptor (which ``EPOLL_CTL_MOD`` would refuse on an exclusive
    entry: we leave such a descriptor alone), and unregisters it in
    ``removeReader``, which works on an exclusive entry too.

    Returns:
        Whether *fd* is now registered exclusively; ``False``, with nothing
        changed, on another reactor (``asyncio``, ``poll``, ``select``) or
        a kernel without ``EPOLLEXCLUSIVE``.
    """
    import select

    poller = getattr(reactor, "_poller", None)
    exclusive = getattr(select, "EPOLLEXCLUSIVE", None)
    if exclusive is None or not hasattr(select, "epoll") or not isinstance(poller, select.epoll):
        return False
    if fd not in getattr(reactor, "_reads", ()) or fd in getattr(reactor, "_writes", ()):
        return False
    poller.unregister(fd)
    try:
        poller.register(fd, select.EPOLLIN | exclusive)
    except OSError:
        poller.register(fd, select.EPOLLIN)
        return False
    return True


__all__ = [
    "BUSY",
    "can_send_now",
    "cap_accept_batch",
    "CLOSING",
    "disconnector",
    "exclusive_reader",
    "half_close",
    "IDLE",
    "io_thread",
    "make_runnable_again",
    "nothing_queued",
    "proxied_endpoint",
    "reactor_was_stopped",
    "reactor_work",
    "reap_process",
    "set_io_thread",
    "ssl_description_options",
    "stop_reactor_thread_pool",
    "stream_server_transport",
    "tcp_parameters",
    "TCPParameters",
    "unix_parameters",
    "UNIXParameters",
    "widen_listen_backlog",
]
