# -*- test-case-name: tests.test_transport_socket -*-
"""A blocking socket facade over a Twisted transport.

Theory of operation
===================

When a server listens on a Twisted endpoint (``ssl:``, ``haproxy:``,
``systemd:``...), the bytes of a connection pass through a Twisted transport:
Twisted does the TLS, Twisted parses the PROXY header.  Handlers, though, are
blocking ``socketserver`` code running in a thread that is *not* the reactor
thread.  This module joins the two with a pair of objects per connection:

* :class:`TransportSocketProtocol` lives on the **reactor thread**.  It is the
  transport's protocol: it alone calls the transport, and it is the transport's
  streaming producer.
* :class:`TransportSocket` lives on the **handler thread**.  It is what the
  handler gets as ``request``: ``recv``/``sendall``/``makefile``/``close``...
  with the blocking, timeout and error behaviour of ``socket.socket``.  It never
  touches the transport; it asks the reactor to, with ``callFromThread``.

Between them sits one :class:`_Bridge`: the only state both threads touch,
guarded by one lock with two conditions (``readable``, ``writable``).  The
reactor thread never waits on anything but that lock, which is only ever held
for a few bookkeeping lines, so the reactor never blocks.

Incoming bytes
--------------
``dataReceived`` appends to ``bridge.received`` (a ``bytearray``) and wakes a
waiting reader; a ``recv`` that finds bytes buffered returns without a reactor
hop.  When the buffer reaches :data:`RECEIVE_HIGH_WATER`, the protocol calls
``transport.pauseProducing()`` (``read_paused``); when a reader drains it to
:data:`RECEIVE_LOW_WATER`, the reader queues *one* hop (``resume_requested``)
that calls ``resumeProducing()``.  Memory per connection is therefore bounded
by the high-water mark plus one delivery from the transport.

Outgoing bytes
--------------
``send``/``sendall`` append ``bytes`` chunks to ``bridge.outgoing`` and queue a
flush hop unless one is already queued (``flush_requested``): one hop per call,
and back-to-back calls share hops.  The flush hop hands the chunks to the
transport, then subtracts them from ``outgoing_bytes`` and wakes writers.  A
writer waits while

* ``outgoing_bytes`` has reached :data:`SEND_WINDOW` (the reactor is behind), or
* ``write_paused`` is set: the protocol registered a streaming producer
  (:class:`_OutgoingProducer`) with the transport, and the transport pauses it
  when its own write buffer fills (a client that does not read) and resumes it
  once the buffer has drained.

So what a slow reader can make the server hold is one window plus the
transport's buffer, whatever the handler writes.

How a connection ends
---------------------
* The peer finishes sending: ``readConnectionLost`` (TCP half-close; we provide
  ``IHalfCloseableProtocol`` so the handler can still answer) or
  ``connectionLost`` sets ``read_eof``; readers get what is buffered, then
  ``b""``.
* The connection goes away: ``connectionLost`` records ``lost`` (clean, or the
  errno of a reset; over TLS a close without ``close_notify`` counts as clean,
  as with the ``ssl`` module's ``suppress_ragged_eofs``), drops unsent bytes
  and wakes *every* waiter: a handler blocked in ``recv`` returns EOF or raises
  ``ConnectionResetError``, one blocked in ``sendall`` raises
  ``BrokenPipeError``/``ConnectionResetError``.
* The handler closes: ``close()`` sets ``closed`` under the lock (so every later
  call, and any other thread waiting, raises ``OSError(EBADF)``) and queues a
  close hop.  Hops run in the order they were queued, so the close hop runs
  after the flushes of everything written before: it unregisters the producer
  and calls ``loseConnection()``, which sends what the transport still buffers,
  then closes.  Nothing written before ``close()`` is lost: on TCP the close
  *lingers*: it half-closes after the last byte and reads (discarding) until
  the peer's FIN, for at most :data:`LINGER_TIMEOUT` seconds, because closing
  with unread input would make the kernel reset the connection and the peer
  would lose the end of the reply.
* ``close()`` racing ``connectionLost``: both the close hop and
  ``connectionLost`` run on the reactor thread, so they are ordered; the close
  hop does nothing once ``lost`` is set, and ``connectionLost`` after ``closed``
  only records what the handler can no longer observe.
* ``shutdown(SHUT_WR)`` queues a hop that flushes and half-closes with
  ``loseWriteConnection()`` when the transport really is a TCP connection (a
  PROXY-protocol wrapper passes bytes through, so it counts; TLS does not
  support half-close); otherwise the write side is closed locally and the
  connection ends at ``close()``.

How a connection starts
-----------------------
``connectionMade`` registers the producer, builds the :class:`TransportSocket`
and calls ``on_connection(transport_socket, client_address)`` on the reactor
thread.

Behind the PROXY protocol (a ``ProxyHeaderPolicy`` given), a connection
first goes through its header stage (``proxy_stage``), still on the reactor
thread, before any ``TransportSocket`` exists; then ``client_address``,
``getpeername()`` and ``getsockname()`` are those the header names.  The
protocol sits directly on the TCP transport (see
``endpoints.proxy_protocol_endpoint``), so a client's half-close reaches it as
``readConnectionLost`` and the handler can still answer.

Which thread owns what
----------------------
* Reactor thread: the transport, the producer registration, ``lost``,
  ``read_paused``.
* Handler thread(s): timeout, makefile reference count, the cached addresses.
* Both, under the lock: everything in :class:`_Bridge`.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from zope.interface import implementer

from txsocketserver._core import lifecycle
from txsocketserver._twisted import compat
from txsocketserver._twisted.addresses import (
    SocketAddress,
    socket_address,
    socket_family,
    underlying_socket,
)
from txsocketserver._twisted.proxy_protocol import ProxyHeader
from txsocketserver._twisted.proxy_stage import (
    ProxyHeaderPolicy,
    ProxyHeaderStage,
    begin_header_stage,
)

# Bytes buffered for the handler before the transport is asked to stop reading.
RECEIVE_HIGH_WATER = 256 * 1024
# Bytes left in the buffer when the handler's reads ask the transport to read again.
RECEIVE_LOW_WATER = 64 * 1024
# Bytes accepted by send/sendall that the reactor has not yet handed to the
# transport; a writer waits beyond this.  The transport's own buffer comes on top.
SEND_WINDOW = 256 * 1024
# Seconds a closed connection keeps reading, after its FIN, for the peer's FIN
# (see TransportSocketProtocol._close); Apache's lingering close waits 2 s too.
LINGER_TIMEOUT = 2.0

#: ``on_connection(transport_socket, client_address)``: see TransportSocketProtocol.
ConnectionCallback = Callable[["TransportSocket", SocketAddress], object]

_log = Logger()
# Connections refused or ended before a handler got them: the operator's log.
_connection_log = Logger(namespace="txsocketserver")


# socket.MSG_* are IntFlag members: every ``&`` or ``|`` on them runs enum
# code, which cost more than the rest of a small recv/sendall together.
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_WAITALL = int(socket.MSG_WAITALL)
_MSG_PEEK = int(socket.MSG_PEEK)
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_RECEIVE_FLAGS = _MSG_PEEK | _MSG_WAITALL | _MSG_DONTWAIT
_SEND_FLAGS = _MSG_DONTWAIT | _MSG_NOSIGNAL

# Looked up once: twisted.python.threadable sits behind a deprecation proxy
# whose attribute access is slow enough to show on every recv and sendall.
_in_reactor_thread = threadable.isInIOThread


def bad_file_descriptor(detail: str | None = None) -> OSError:
    """The ``OSError(EBADF)`` a closed socket raises, with *detail* appended."""
    message = os.strerror(errno.EBADF)
    return OSError(errno.EBADF, message if detail is None else f"{message}: {detail}")


class _Bridge:
    """The state both threads share; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Notified when bytes arrive, at EOF, on loss and on close.
        self.readable = threading.Condition(self.lock)
        # Notified when the window opens, the producer resumes, on loss and on close.
        self.writable = threading.Condition(self.lock)

        self.received = bytearray()
        self.read_eof = False  # the peer will send nothing more
        self.read_shut = False  # shutdown(SHUT_RD): drop what arrives
        self.read_paused = False  # transport.pauseProducing() in effect
        self.resume_requested = False  # a resume hop is queued

        self.outgoing: list[bytes] = []
        self.outgoing_bytes = 0  # accepted from the handler, not yet in the transport
        self.flush_requested = False  # a flush hop is queued
        self.write_paused = False  # the transport paused our producer
        self.write_shut = False  # shutdown(SHUT_WR) was called

        self.closed = False  # the handler closed the socket
        self.lost = False  # connectionLost has run
        self.lost_errno = 0  # 0 for a clean close, else ECONNRESET
        self.payload_seen = False  # a byte of payload has arrived


@implementer(IPushProducer)
class _OutgoingProducer:
    """The producer we register with the transport; it only flips ``write_paused``.

    The transport calls it on the reactor thread when its write buffer fills
    (pause) and drains (resume); handler threads blocked in ``sendall`` wait
    for the resume.
    """

    def __init__(self, bridge: _Bridge) -> None:
        self._bridge = bridge

    def pauseProducing(self) -> None:
        with self._bridge.lock:
            self._bridge.write_paused = True

    def resumeProducing(self) -> None:
        with self._bridge.lock:
            self._bridge.write_paused = False
            self._bridge.writable.notify_all()

    def stopProducing(self) -> None:
        # connectionLost follows and wakes the writers with the right error.
        pass


@implementer(IHalfCloseableProtocol)
class TransportSocketProtocol(Protocol):
    """The reactor side: a protocol that hands a :class:`TransportSocket` onwards.

    Use it as the protocol of the factory given to ``endpoint.listen`` (the
    endpoint listener's factory makes one per connection).

    Args:
        on_connection: called on the reactor thread as
            ``on_connection(transport_socket, client_address)`` once per
            connection, ``client_address`` being what ``socket.accept()`` returns
            for the peer's family (see :func:`socket_address`).  For a
            ``haproxy:`` endpoint it is called once the PROXY header has arrived,
            with the real client's address.  It must not block: it typically
            hands the socket to a handler thread.  From then on the callee owns
            the socket and must ``close()`` it.
        reactor: the reactor that runs the transport; the global one by default.
        proxy: read a PROXY protocol header first, admitting connections as
            this policy says (see the module docstring); ``on_connection`` is
            then called once the header has arrived, with the address it names.

    Error handling:
        If ``on_connection`` raises, the error is logged and the connection is
        closed.
    """

    def __init__(
        self,
        on_connection: ConnectionCallback,
        *,
        reactor: Any = None,
        proxy: ProxyHeaderPolicy | None = None,
    ) -> None:
        self._on_connection = on_connection
        self._reactor = reactor
        self._bridge = _Bridge()
        self.socket: TransportSocket | None = None
        self._proxy = proxy
        self._stage: ProxyHeaderStage | None = None
        self._proxied: ProxyHeader | None = None
        self._write_half_closed = False  # loseWriteConnection was called
        self._linger: Any = None  # the lingering close's deadline, while it runs
        #: The connection's lifecycle record (``None``: not observed); set
        #: before ``connectionMade`` by whoever observes it.
        self.record: lifecycle.ConnectionRecord | None = None

    @property
    def awaiting_header(self) -> bool:
        """Whether the connection is still in its PROXY header stage."""
        return self._stage is not None and self._stage.active

    # IProtocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        if self._proxy is None:
            self._start()
            return
        self._stage = begin_header_stage(
            self.transport, self._proxy, self._reactor, self._proxied_by, self.record
        )

    def _proxied_by(self, header: ProxyHeader) -> None:
        self._proxied = header
        self._start()

    def _start(self) -> None:
        self.transport.registerProducer(_OutgoingProducer(self._bridge), True)
        header = self._proxied
        peer = self.transport.getPeer()
        family = socket_family(peer)
        client = socket_address(peer)
        host = socket_address(self.transport.getHost())
        if header is not None and header.family is not None:
            family, client, host = header.family, header.source, header.destination  # type: ignore[assignment]
        self.socket = TransportSocket(
            self,
            self._bridge,
            family=family,
            peer=client,
            host=host,
            os_socket=underlying_socket(self.transport),
        )
        record = self.record
        if record is not None:
            record.client_address = client
            record.bytes_received = record.bytes_sent = 0
            self.socket.lifecycle_record = record
        try:
            self._on_connection(self.socket, self.socket.getpeername())
        except Exception:
            _log.failure("on_connection raised; closing the connection")
            self.socket.close()

    def evict(
        self, reason: str, level: str = "warn", refusal: str = lifecycle.PROXY_HEADER
    ) -> None:
        """Close a connection still in its header stage, logging *reason* at
        *level* (a ``twisted.logger`` level name); reactor thread.  *refusal*:
        the reason its lifecycle record gives."""
        if self.awaiting_header:
            assert self._stage is not None
            self._stage.evict(reason, level, refusal)

    # Payload ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._stage is not None and self._stage.active:
            data = self._stage.feed(data)
            if not data:
                return
        bridge = self._bridge
        with bridge.lock:
            if bridge.read_shut or bridge.closed:
                return
            bridge.payload_seen = True
            bridge.received += data
            pause = not bridge.read_paused and len(bridge.received) >= RECEIVE_HIGH_WATER
            if pause:
                bridge.read_paused = True
            bridge.readable.notify()
        if pause:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self._stage is not None and self._stage.read_lost():
            return
        with self._bridge.lock:
            self._bridge.read_eof = True
            self._bridge.readable.notify_all()
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # Only happens after our own loseWriteConnection: nothing to record.
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._stage is not None:
            self._stage.connection_lost(reason)
        if self.record is not None and self.socket is None:
            # It never reached a handler (refused, or gone in its header
            # stage): its lifecycle ends here.
            lifecycle.ended(self.record)
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        bridge = self._bridge
        with bridge.lock:
            bridge.lost = True
            bridge.read_eof = True
            if not self._clean_end(reason):
                bridge.lost_errno = errno.ECONNRESET
            bridge.outgoing.clear()
            bridge.outgoing_bytes = 0
            bridge.readable.notify_all()
            bridge.writable.notify_all()

    def _clean_end(self, reason: Failure) -> bool:
        """Whether the connection ended as an end of stream rather than a reset.

        Over TLS, Twisted reports a TCP close without a TLS ``close_notify`` as
        ``ConnectionLost``, as it reports a reset.  Most clients close that way
        (Python's ``ssl`` does), so, like the ``ssl`` module's default
        ``suppress_ragged_eofs=True``, we read it as an end of stream.
        """
        if reason.check(ConnectionDone):
            return True
        return bool(reason.check(ConnectionLost)) and ISSLTransport.providedBy(self.transport)

    # Hops queued by the handler side (reactor thread) ---------------------------

    def _call_soon(self, function: Callable[[], None]) -> None:
        """Queue ``function`` for the reactor thread (FIFO with all other hops)."""
        self._reactor.callFromThread(function)

    def _flush(self) -> None:
        """Hand everything the handler queued to the transport."""
        bridge = self._bridge
        with bridge.lock:
            chunks, bridge.outgoing = bridge.outgoing, []
            bridge.flush_requested = False
            lost = bridge.lost
        if not chunks or lost:
            return
        size = sum(map(len, chunks))
        # The transport may call our producer's pauseProducing in here, which
        # takes the lock: hence the write happens outside it.
        if len(chunks) == 1:
            self.transport.write(chunks[0])
        else:
            self.transport.writeSequence(chunks)
        with bridge.lock:
            if not bridge.lost:
                bridge.outgoing_bytes -= size
            bridge.writable.notify_all()

    def _resume_reading(self) -> None:
        bridge = self._bridge
        with bridge.lock:
            bridge.resume_requested = False
            if not bridge.read_paused or bridge.lost:
                return
            if len(bridge.received) > RECEIVE_LOW_WATER:
                return
            bridge.read_paused = False
        self.transport.resumeProducing()

    def _shutdown_write(self) -> None:
        self._flush()
        if self._bridge.lost:
            return
        half_close = compat.half_close(self.transport)
        if half_close is not None:
            self.transport.unregisterProducer()
            self._write_half_closed = True
            half_close()

    def _close(self) -> None:
        if self._bridge.lost:
            return
        self._flush()
        if self._bridge.lost:
            return
        # A registered producer would keep the transport open: finish first.
        self.transport.unregisterProducer()
        half_close = None if self._bridge.read_eof else compat.half_close(self.transport)
        if half_close is None:
            self.transport.loseConnection()
            return
        # A lingering close: closing a socket with unread input makes the
        # kernel send a reset, and the peer's kernel then drops our last bytes
        # unread.  So send a FIN after them, keep reading (and discarding)
        # until the peer's own FIN, for at most LINGER_TIMEOUT seconds.
        if not self._write_half_closed:
            self._write_half_closed = True
            half_close()
        self._linger = self._reactor.callLater(LINGER_TIMEOUT, self.transport.loseConnection)


class TransportSocket:
    """A connected stream socket, as a blocking handler sees it, over a transport.

    Created by :class:`TransportSocketProtocol`; handlers use it exactly like the
    socket ``accept()`` returns: ``recv``, ``recv_into``, ``send``, ``sendall``,
    ``sendfile``, ``makefile``, ``settimeout``, ``shutdown``, ``close``...  The
    blocking calls must not be made on the reactor thread (``RuntimeError``).

    Resource handling:
        ``close()`` (or leaving a ``with`` block) sends everything written so far,
        then closes the connection; files from ``makefile()`` keep the connection
        open until they are closed too, as with ``socket.socket``.  Whoever got
        the socket from ``on_connection`` must close it.

    Error handling:
        As ``socket.socket``: ``TimeoutError`` when a timeout expires,
        ``BlockingIOError`` in non-blocking mode, ``ConnectionResetError`` after a
        peer reset, ``BrokenPipeError`` when writing after the connection ended,
        ``OSError(EBADF)`` after ``close()``.
    """

    type = socket.SOCK_STREAM
    proto = 0

    def __init__(
        self,
        protocol: TransportSocketProtocol,
        bridge: _Bridge,
        *,
        family: socket.AddressFamily,
        peer: SocketAddress,
        host: SocketAddress,
        os_socket: socket.socket | None,
    ) -> None:
        self._protocol = protocol
        self._bridge = bridge
        self.family = family
        self._peer = peer
        self._host = host
        self._os_socket = os_socket
        self._timeout: float | None = socket.getdefaulttimeout()
        self._closed = False  # close() called; the connection ends when _io_refs is 0
        self._io_refs = 0  # open makefile() objects
        #: The connection's lifecycle record, if observed: the server's
        #: serving loop takes it over, and the handler's reads and writes
        #: count their bytes in it.
        self.lifecycle_record: lifecycle.ConnectionRecord | None = None

    def __repr__(self) -> str:
        state = "closed" if self._bridge.closed else f"laddr={self._host!r}, raddr={self._peer!r}"
        return f"<{type(self).__name__} fd={self.fileno()}, {state}>"

    def __enter__(self) -> TransportSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._closed:
            self.close()

    # Statistics ---------------------------------------------------------------------

    @property
    def pending_write_bytes(self) -> int:
        """Bytes accepted by ``send``/``sendall`` not yet handed to the transport."""
        with self._bridge.lock:
            return self._bridge.outgoing_bytes

    @property
    def ended_before_payload(self) -> bool:
        """Whether the connection ended before a byte of payload arrived: a TCP
        health check or a port scan, not a failed request."""
        with self._bridge.lock:
            return self._bridge.lost and not self._bridge.payload_seen

    @property
    def buffered_read_bytes(self) -> int:
        """Bytes received from the transport that the handler has not read yet."""
        with self._bridge.lock:
            return len(self._bridge.received)

    # Timeouts -----------------------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        """Set the timeout of blocking calls: seconds, ``None`` (block), ``0`` (non-blocking)."""
        if value is not None:
            value = float(value)
            if value < 0.0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        """The timeout set by ``settimeout``; ``socket.getdefaulttimeout()`` at first."""
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        """``setblocking(True)`` means ``settimeout(None)``; ``False``, ``settimeout(0)``."""
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        """False in non-blocking mode (timeout ``0``), True otherwise."""
        return self._timeout != 0.0

    # Waiting --------------------------------------------------------------------------

    def _deadline(self, flags: int) -> float | None:
        """When a call started now gives up: ``None`` never, ``-1.0`` non-blocking."""
        timeout = 0.0 if flags & _MSG_DONTWAIT else self._timeout
        if timeout is None:
            return None
        if timeout == 0.0:
            return -1.0
        return time.monotonic() + timeout

    @staticmethod
    def _wait(
        condition: threading.Condition, ready: Callable[[], bool], deadline: float | None
    ) -> None:
        """Wait, holding the lock, until ``ready()``; raise when the deadline passes."""
        while not ready():
            if deadline is None:
                condition.wait()
                continue
            if deadline < 0.0:
                raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
            remaining = deadline - time.monotonic()
            if remaining <= 0.0:
                raise TimeoutError("timed out")
            condition.wait(remaining)

    def _check_thread(self, call: str) -> None:
        if _in_reactor_thread():
            raise RuntimeError(
                f"TransportSocket.{call}() was called on the reactor thread: it waits for "
                "the reactor and would deadlock. Call it from a handler thread "
                "(e.g. twisted.internet.threads.deferToThread)."
            )

    # Reading --------------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Receive up to ``bufsize`` bytes; ``b""`` at end of stream.

        Args:
            bufsize: the most bytes to return.
            flags: ``MSG_PEEK``, ``MSG_WAITALL`` and ``MSG_DONTWAIT`` are honoured;
                others raise ``OSError(EOPNOTSUPP)``.

        Error handling:
            ``TimeoutError``/``BlockingIOError`` when nothing arrives in time;
            ``ConnectionResetError`` once after a peer reset (buffered bytes
            are delivered first); ``OSError(EBADF)`` after ``close()``.
        """
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if flags & _MSG_WAITALL and not flags & _MSG_PEEK:
            buffer = bytearray(bufsize)
            count = self.recv_into(buffer, bufsize, flags)
            del buffer[count:]
            return bytes(buffer)
        return self._receive(None, bufsize, flags, "recv")  # type: ignore[return-value]

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Receive up to ``nbytes`` (default: ``len(buffer)``) bytes into ``buffer``.

        Returns:
            The number of bytes written into ``buffer``; 0 at end of stream.

        Error handling:
            As :meth:`recv`.
        """
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        with memoryview(buffer) as view, view.cast("B") as target:
            if nbytes == 0:
                nbytes = len(target)
            elif nbytes > len(target):
                raise ValueError("buffer too small for requested bytes")
            return self._receive(target, nbytes, flags, "recv_into")  # type: ignore[return-value]

    def _receive(self, target: memoryview | None, size: int, flags: int, call: str) -> bytes | int:
        """The one read path: copy buffered bytes into ``target``, or return them.

        ``MSG_WAITALL`` (only with a ``target``) keeps copying as bytes arrive,
        draining the buffer each time so that flow control keeps working when
        ``size`` exceeds the high-water mark.
        """
        self._check_thread(call)
        if flags & ~_RECEIVE_FLAGS:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        bridge = self._bridge
        peek = bool(flags & _MSG_PEEK)
        wait_all = bool(flags & _MSG_WAITALL) and not peek and target is not None
        deadline = self._deadline(flags)
        received = bridge.received

        def ready() -> bool:
            return bool(received) or bridge.read_eof or bridge.read_shut or bridge.closed

        done = 0
        with bridge.lock:
            while True:
                if bridge.closed:
                    raise bad_file_descriptor()
                if done == size:
                    return done if target is not None else b""
                self._wait(bridge.readable, ready, deadline)
                if bridge.closed:
                    raise bad_file_descriptor()
                count = min(size - done, len(received))
                if count == 0:
                    if done == 0 and bridge.lost_errno and not bridge.read_shut:
                        code, bridge.lost_errno = bridge.lost_errno, 0
                        raise ConnectionResetError(code, os.strerror(code))
                    return done if target is not None else b""
                with memoryview(received) as source:
                    if target is None:
                        data = bytes(source[:count])
                    else:
                        target[done : done + count] = source[:count]
                if not peek:
                    del received[:count]
                    self._maybe_resume_reading()
                    if self.lifecycle_record is not None:
                        self.lifecycle_record.bytes_received += count  # type: ignore[operator]
                done += count
                if target is None:
                    return data
                if not wait_all:
                    return done

    def _maybe_resume_reading(self) -> None:
        """Queue a resume hop once the buffer has drained; called with the lock held."""
        bridge = self._bridge
        if (
            bridge.read_paused
            and not bridge.resume_requested
            and len(bridge.received) <= RECEIVE_LOW_WATER
        ):
            bridge.resume_requested = True
            self._protocol._call_soon(self._protocol._resume_reading)

    # Writing --------------------------------------------------------------------------

    def send(self, data: Any, flags: int = 0) -> int:
        """Queue as much of ``data`` as the send window takes; return how much.

        Blocks (up to the timeout) only while nothing at all can be queued.

        Args:
            data: a bytes-like object.
            flags: ``MSG_DONTWAIT`` makes this call non-blocking; ``MSG_NOSIGNAL``
                is accepted (there are no signals); others raise
                ``OSError(EOPNOTSUPP)``.

        Returns:
            The number of bytes queued; they reach the peer unless the
            connection breaks.
        """
        with memoryview(data) as view, view.cast("B") as octets:
            return self._send(data, octets, flags, "send", everything=False)

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Queue all of ``data``, waiting while the peer or the reactor is behind.

        The timeout bounds the whole call, as for ``socket.sendall``.

        Error handling:
            ``TimeoutError`` if the data could not all be queued in time (part
            of it may have been sent); ``BrokenPipeError`` after the connection
            ended or ``shutdown(SHUT_WR)``; ``ConnectionResetError`` after a
            reset; ``OSError(EBADF)`` after ``close()``.
        """
        with memoryview(data) as view, view.cast("B") as octets:
            self._send(data, octets, flags, "sendall", everything=True)

    def _send(self, data: Any, octets: memoryview, flags: int, call: str, everything: bool) -> int:
        """Queue ``octets`` in window-sized chunks; the shared write path."""
        self._check_thread(call)
        if flags & ~_SEND_FLAGS:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        bridge = self._bridge
        deadline = self._deadline(flags)
        total = len(octets)
        sent = 0

        def ready() -> bool:
            return (
                bridge.closed
                or bridge.lost
                or bridge.write_shut
                or (not bridge.write_paused and bridge.outgoing_bytes < SEND_WINDOW)
            )

        with bridge.lock:
            while True:
                if bridge.closed:
                    raise bad_file_descriptor()
                if sent == total and (everything or total == 0):
                    return sent
                self._wait(bridge.writable, ready, deadline)
                if bridge.closed:
                    raise bad_file_descriptor()
                if bridge.lost:
                    code = bridge.lost_errno or errno.EPIPE
                    error = ConnectionResetError if code == errno.ECONNRESET else BrokenPipeError
                    raise error(code, os.strerror(code))
                if bridge.write_shut:
                    raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
                count = min(total - sent, SEND_WINDOW - bridge.outgoing_bytes)
                if type(data) is bytes and count == total:
                    chunk = data  # immutable: no copy needed
                else:
                    chunk = bytes(octets[sent : sent + count])
                bridge.outgoing.append(chunk)
                bridge.outgoing_bytes += count
                if self.lifecycle_record is not None:
                    self.lifecycle_record.bytes_sent += count  # type: ignore[operator]
                sent += count
                if not bridge.flush_requested:
                    bridge.flush_requested = True
                    self._protocol._call_soon(self._protocol._flush)
                if not everything:
                    return sent

    def sendfile(self, file: BinaryIO, offset: int = 0, count: int | None = None) -> int:
        """Send a file's contents with ``sendall``, as ``socket.sendfile`` falls back to.

        Returns:
            The number of bytes sent.  The file position is left after the last
            byte sent, as with ``socket.sendfile``.
        """
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if offset:
            file.seek(offset)
        total = 0
        while count is None or total < count:
            block = SEND_WINDOW if count is None else min(SEND_WINDOW, count - total)
            data = file.read(block)
            if not data:
                break
            self.sendall(data)
            total += len(data)
        return total

    # Files ----------------------------------------------------------------------------

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """Return a file object reading/writing this socket, like ``socket.makefile``.

        The raw stream is a ``socket.SocketIO`` over this object, wrapped in
        ``io.BufferedReader``/``BufferedWriter``/``BufferedRWPair`` and, for text
        modes, ``io.TextIOWrapper``; only ``r``, ``w`` and ``b`` are allowed in
        ``mode``.

        Resource handling:
            The connection stays open until this socket *and* every file made
            from it are closed.
        """
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:
        """Called by ``SocketIO.close``: the last file closing may end the connection."""
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._real_close()

    # Ending ---------------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """Shut down reading (``SHUT_RD``), writing (``SHUT_WR``) or both.

        ``SHUT_WR`` sends what was written, then a TCP half-close (FIN) when the
        transport supports it (TCP, TCP behind a PROXY header); over TLS the write
        side is only closed locally and the connection ends at ``close()``.
        ``SHUT_RD`` discards buffered and future incoming bytes; ``recv`` returns
        ``b""``.

        Error handling:
            ``OSError(EINVAL)`` for another ``how``; ``OSError(ENOTCONN)`` when
            the connection has already ended; ``OSError(EBADF)`` after ``close()``.
        """
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        bridge = self._bridge
        with bridge.lock:
            if bridge.closed:
                raise bad_file_descriptor()
            if bridge.lost:
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))
            if how in (socket.SHUT_RD, socket.SHUT_RDWR):
                bridge.read_shut = True
                bridge.received.clear()
                bridge.readable.notify_all()
                self._maybe_resume_reading()
            if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not bridge.write_shut:
                bridge.write_shut = True
                bridge.writable.notify_all()
                self._protocol._call_soon(self._protocol._shutdown_write)

    def close(self) -> None:
        """Close the socket: send everything written so far, then end the connection.

        Never blocks; idempotent.  If files from ``makefile()`` are still open,
        the connection ends when the last of them is closed.  Other threads
        blocked on this socket get ``OSError(EBADF)``.
        """
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        bridge = self._bridge
        with bridge.lock:
            if bridge.closed:
                return
            bridge.closed = True
            bridge.received.clear()
            bridge.readable.notify_all()
            bridge.writable.notify_all()
        self._protocol._call_soon(self._protocol._close)

    # Addresses and options ------------------------------------------------------------

    def getpeername(self) -> SocketAddress:
        """The peer's address as ``socket.accept()`` gives it (the real client behind PROXY)."""
        if self._bridge.closed:
            raise bad_file_descriptor()
        return self._peer

    def getsockname(self) -> SocketAddress:
        """The local address (for ``haproxy:``, the destination named by the PROXY header)."""
        if self._bridge.closed:
            raise bad_file_descriptor()
        return self._host

    def fileno(self) -> int:
        """The OS socket's descriptor under the transport, or -1.

        -1 when there is no OS socket (an in-memory transport) and after the
        connection was closed or lost.  Over TLS this is the TCP socket carrying
        ciphertext: use it to identify the connection or to ``select`` on it
        knowing that bytes may already wait in this object's buffer, never to
        read or write.
        """
        if self._bridge.closed or self._os_socket is None:
            return -1
        return self._os_socket.fileno()

    def setsockopt(self, level: int, optname: int, value: Any, optlen: int | None = None) -> None:
        """Set an option on the OS socket under the transport; ignored if there is none.

        Called straight on the Python socket object, not through the reactor: a
        closed socket object raises ``OSError(EBADF)`` rather than touching a
        reused descriptor, and options do not interact with Twisted's I/O.
        """
        if self._bridge.closed:
            raise bad_file_descriptor()
        if self._os_socket is None:
            return
        if optlen is None:
            self._os_socket.setsockopt(level, optname, value)
        else:
            self._os_socket.setsockopt(level, optname, value, optlen)

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        """Read an option of the OS socket under the transport; 0 (or zero bytes) if none."""
        if self._bridge.closed:
            raise bad_file_descriptor()
        if self._os_socket is None:
            return 0 if buflen is None else bytes(buflen)
        if buflen is None:
            return self._os_socket.getsockopt(level, optname)
        return self._os_socket.getsockopt(level, optname, buflen)


__all__ = [
    "RECEIVE_HIGH_WATER",
    "RECEIVE_LOW_WATER",
    "SEND_WINDOW",
    "ConnectionCallback",
    "ProxyHeaderPolicy",
    "SocketAddress",
    "TransportSocket",
    "TransportSocketProtocol",
    "socket_address",
]
