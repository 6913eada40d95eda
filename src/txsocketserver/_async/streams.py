# -*- test-case-name: tests.test_async_streams -*-
"""The awaitable streams of an async handler: ``rfile``, ``wfile`` and ``request``.

All of it runs on the reactor thread.  The :class:`~txsocketserver._async.protocol.Connection`
protocol feeds the reader (``dataReceived``) and tells the writer when the
transport's buffer fills and drains (it is the transport's push producer).

Reader
------
Bytes wait in one ``bytearray``.  The reads are plain coroutines (a line's,
for ``readline`` and ``async for``, a generator-based one that yields its
:class:`Wait` itself): one that the buffer can satisfy returns without
suspending (on CPython 3.11+ cheaper than any hand-made awaitable, whose
``StopIteration`` costs more than the read); otherwise it waits on a
:class:`Wait` that the next ``dataReceived``, end of file, loss, timeout or
cancellation fires.  Nothing is
taken from the buffer until a read is complete, so a read interrupted by a
timeout or a cancellation loses no byte.  Beyond ``limit`` buffered bytes the
transport is asked to stop reading (the client then waits in TCP flow control);
it reads again once a read brings the buffer down to half of that, or when a
read needs more bytes than are buffered (a long line is never an error).

Writer
------
``write()`` queues at once.  What a handler writes in one step (between two
``await`` that suspend) reaches the transport in one piece when the step ends
(``HandlerTask`` calls ``flush()``), or as soon as ``FLUSH_AT`` bytes are
waiting; a write outside a step goes at once.  The transport of a connection
the server accepted itself sends it then and there when its buffer is empty
(``_twisted.adopted_transport``): a reply costs one ``send()``, and the bytes of
one reply leave together, with no Nagle stall between them.  When the transport's
buffer is full Twisted pauses its producer (us): ``drain()`` then waits until it
resumes.  Bytes written while paused are counted; past ``max_buffer`` the
connection is aborted and ``write()`` raises ``ConnectionAbortedError`` (which
reaches ``handle_error``), so a handler that never drains cannot grow memory
without bound.
"""

from __future__ import annotations

import asyncio
import errno
import io
import socket
import time
import types
from collections.abc import Awaitable, Generator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred

#: Bytes a reader buffers before it asks the transport to stop reading.
DEFAULT_READ_LIMIT = 64 * 1024
#: Bytes a handler may write while the client is not reading before the connection is aborted.
DEFAULT_MAX_WRITE_BUFFER = 4 * 1024 * 1024
#: Bytes one step may write before they go to the transport without waiting for the step's end.
FLUSH_AT = 64 * 1024

_monotonic = time.monotonic
_IncompleteReadError = asyncio.IncompleteReadError
_LimitOverrunError = asyncio.LimitOverrunError


class Wait:
    """What a stream read or ``drain()`` awaits while it has to wait.

    :class:`~txsocketserver._async.task.HandlerTask` resumes the handler
    directly when it fires, with no Deferred in between (the common case, and
    the cheap one).  Awaited in a coroutine that something else drives
    (``Deferred.fromCoroutine``, say), it waits on a Deferred instead, so the
    streams work there too.
    """

    # Class defaults and no __init__: made for nearly every line a
    # line-at-a-time handler reads, so made as cheaply as Python allows.
    task: Any = None  # the HandlerTask waiting, if it is ours
    deferred: Deferred[None] | None = None  # for a Deferred-driven coroutine
    done = False
    error: BaseException | None = None  # raised at the await (timeout, cancellation)
    timer: Any = None  # the handler's timeout, running

    @classmethod
    def bounded(cls, connection: Any) -> Wait:
        """A wait that times out after the connection's ``timeout``, if any."""
        wait = cls()
        timeout = connection.timeout
        if timeout is not None:
            wait.timer = connection.call_later(timeout, wait.fire, TimeoutError("timed out"))
        return wait

    def __await__(self) -> Generator[Any, Any, None]:
        # AsyncReader._line does the same inline (keep them alike).
        sent = yield self
        if sent is self and not self.done:
            # Sent back unchanged: not our task (which sends None) but a
            # Deferred-driven coroutine.  Wait the Deferred way.
            yield self.as_deferred()
        if self.error is not None:
            raise self.error

    def as_deferred(self) -> Deferred[None]:
        """The Deferred that a coroutine driven by something else than our
        task waits on instead."""
        if self.deferred is None:
            self.deferred = Deferred(self._cancel_deferred)
        return self.deferred

    def fire(self, error: BaseException | None = None) -> None:
        """Wake the waiting coroutine (raising *error* at its ``await``)."""
        if self.done:
            return
        self.done = True
        self.error = error
        timer = self.timer
        if timer is not None and timer.active():
            timer.cancel()
        task = self.task
        if task is not None:
            task.resume()
        elif self.deferred is not None and not self.deferred.called:
            self.deferred.callback(None)

    def cancel(self) -> None:
        self.fire(CancelledError())

    def _cancel_deferred(self, deferred: Deferred[None]) -> None:
        # A method, not a lambda in __await__: a closure there would give every
        # waiting read a cell (and its idle connection 40 bytes).
        self.fire(CancelledError())


def _reset_error() -> ConnectionResetError:
    return ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


class AsyncReader:
    """``rfile`` of an async stream handler (and of a datagram's, preloaded).

    Reads follow ``io``'s buffered reader where the names match: ``read(n)``
    returns *n* bytes unless the stream ends first, ``readline(size)`` at most
    *size* bytes and never fails on a long line.  ``read1``, ``readexactly``
    and ``readuntil`` are the "whatever has arrived" and asyncio-style reads.

    Error handling:
        A read that needs more bytes than arrived before a reset raises
        ``ConnectionResetError``; ``TimeoutError`` when the handler's
        ``timeout`` passes while waiting; ``CancelledError`` when the handler
        is cancelled.  In each case the buffered bytes stay for the next read.
        Two coroutines waiting on one reader at once is a ``RuntimeError``.
    """

    __slots__ = ("_buffer", "_eof", "_reset", "_waiter", "_connection", "_paused", "limit")

    def __init__(self, connection: Any = None, data: bytes = b"") -> None:
        self._buffer = bytearray(data)
        self._eof = connection is None
        self._reset = False
        self._waiter: Wait | None = None
        self._connection = connection
        self._paused = False
        #: Bytes buffered before the transport stops reading.
        self.limit = DEFAULT_READ_LIMIT

    # -- fed by the protocol ----------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            task = waiter.task
            if task is not None and waiter.timer is None:
                # Wait.fire(), inlined for the common case: once per line.
                waiter.done = True
                task.resume()
            else:
                waiter.fire()
        # Not while a read waits for more: it needs more than the limit holds.
        if len(self._buffer) > self.limit and not self._paused and self._waiter is None:
            self._paused = True
            self._connection.pause_reading()

    def feed_eof(self, reset: bool = False) -> None:
        self._eof = True
        self._reset = self._reset or reset
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.fire()

    # -- the reads ----------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Read *n* bytes (fewer only at end of file); all of them until EOF if negative."""
        buffer = self._buffer
        while True:
            if 0 <= n <= len(buffer):
                return self._take(n)
            if self._eof:
                return self._take_rest()
            await self._more("read")

    async def read1(self, n: int = -1) -> bytes:
        """Read at most *n* bytes (any number if negative), waiting only if none
        are buffered; ``b""`` at end of file."""
        buffer = self._buffer
        while not buffer and n != 0:
            if self._eof:
                return self._take_rest()
            await self._more("read1")
        return self._take(len(buffer) if n < 0 else n)

    def readline(self, size: int = -1) -> Awaitable[bytes]:
        """Read one line, ``b"\\n"`` included: at most *size* bytes if *size* >= 0.

        At *size* bytes, or at end of file, the partial line is returned; the
        rest of a long line comes with the next read.  ``b""`` at end of file.
        """
        return self._line(size, False)

    async def readlines(self, hint: int = -1) -> list[bytes]:
        """Read lines until end of file (or until they total *hint* bytes, if positive)."""
        lines: list[bytes] = []
        total = 0
        while True:
            line = await self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    async def readexactly(self, n: int) -> bytes:
        """Read exactly *n* bytes.

        Error handling:
            ``asyncio.IncompleteReadError`` (an ``EOFError``) at end of file
            before *n* bytes, with the partial bytes in its ``partial``.
        """
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        buffer = self._buffer
        while len(buffer) < n:
            if self._eof:
                self._raise_if_reset()
                raise _IncompleteReadError(self._take_rest(), n)
            await self._more("readexactly")
        return self._take(n)

    async def readuntil(self, separator: bytes = b"\n", limit: int | None = None) -> bytes:
        """Read up to and including *separator*.

        Args:
            separator: what ends the chunk; not empty.
            limit: the longest chunk accepted, separator included (default: ``limit``).

        Error handling:
            ``asyncio.LimitOverrunError`` if *limit* bytes pass without a
            separator (the bytes stay buffered); ``asyncio.IncompleteReadError``
            at end of file without one.
        """
        if not separator:
            raise ValueError("Separator should be at least one-byte string")
        limit = self.limit if limit is None else limit
        buffer = self._buffer
        start = 0
        width = len(separator)
        while True:
            found = buffer.find(separator, start)
            if found >= 0:
                end = found + width
                if end > limit:
                    raise _LimitOverrunError(
                        "Separator is found, but chunk is longer than limit", found
                    )
                return self._take(end)
            if len(buffer) > limit:
                raise _LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", len(buffer)
                )
            if self._eof:
                self._raise_if_reset()
                raise _IncompleteReadError(self._take_rest(), None)
            start = max(0, len(buffer) - width + 1)
            await self._more("readuntil")

    def at_eof(self) -> bool:
        """Whether the stream has ended and every byte has been read."""
        return self._eof and not self._buffer

    def __aiter__(self) -> AsyncReader:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        return self._line(-1, True)

    # -- plumbing -----------------------------------------------------------------------

    @types.coroutine
    def _line(self, size: int, stop_at_eof: bool) -> Generator[Any, Any, bytes]:
        # readline() and async for: one coroutine for both (one await level
        # fewer for every line than async for awaiting readline()), and a
        # generator-based one that waits by yielding the Wait itself, as
        # Wait.__await__ would: one generator fewer per waiting line, alive
        # in every idle connection (208 bytes), and one level fewer to resume.
        buffer = self._buffer
        start = 0  # where to look for b"\n" (the bytes before have none)
        while True:
            end = buffer.find(b"\n", start) + 1
            if end:
                return self._take(end if size < 0 or end <= size else size)
            if 0 <= size <= len(buffer):
                return self._take(size)
            if self._eof:
                line = self._take_rest()
                if not line and stop_at_eof:
                    raise StopAsyncIteration
                return line
            start = len(buffer)
            waiter = self._more("readline")
            sent = yield waiter
            if sent is waiter and not waiter.done:
                yield waiter.as_deferred()  # driven by something else: see Wait.__await__
            if waiter.error is not None:
                raise waiter.error

    def _take(self, n: int) -> bytes:
        buffer = self._buffer
        if n >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        if self._paused and len(buffer) <= self.limit // 2:
            self._resume()
        return data

    def _take_rest(self) -> bytes:
        if not self._buffer:
            self._raise_if_reset()
        return self._take(len(self._buffer))

    def _raise_if_reset(self) -> None:
        if self._reset:
            raise _reset_error()

    def _resume(self) -> None:
        self._paused = False
        if not self._eof:
            self._connection.resume_reading()

    def _more(self, what: str) -> Wait:
        """What to await until something arrives (or the stream ends)."""
        if self._waiter is not None and not self._waiter.done:
            raise RuntimeError(
                f"{what}() called while another coroutine is already waiting on this stream"
            )
        if self._paused:
            # More bytes are needed than the limit holds: read on.
            self._resume()
        connection = self._connection
        if connection.timeout is None:
            waiter = self._waiter = Wait()
        else:
            waiter = self._waiter = Wait.bounded(connection)
        return waiter


class AsyncWriter:
    """``wfile`` of an async stream handler.

    ``write()`` and ``writelines()`` queue at once and never wait; ``await
    drain()`` waits while the client reads slower than the handler writes.

    Error handling:
        After the connection is lost, writes are dropped and ``drain()`` raises
        ``ConnectionResetError`` (a reset) or ``BrokenPipeError``.  Writing
        more than ``max_buffer`` bytes without a ``drain()`` while the client
        does not read aborts the connection: ``write()`` raises
        ``ConnectionAbortedError``.
    """

    __slots__ = (
        "_connection",
        "_transport",
        "_paused",
        "_queued",
        "_drainers",
        "_lost",
        "_reset",
        "_closing",
        "_eof_written",
        "_batch",
        "_batched",
        "batching",
        "max_buffer",
    )

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._transport = connection.transport
        self._paused = False
        self._queued = 0  # bytes written while the transport was paused
        # Made when needed: most connections never wait to drain, and an empty
        # list costs each idle connection 56 bytes.
        self._drainers: list[Wait] | None = None
        self._lost = False
        self._reset = False
        self._closing = False
        self._eof_written = False
        self._batch: list[bytes] | None = None  # written during the current step
        self._batched = 0
        #: Set by the handler's task while a step runs: writes wait for its end.
        self.batching = False
        #: Bytes written while the client is not reading before the connection is aborted.
        self.max_buffer = DEFAULT_MAX_WRITE_BUFFER

    def write(self, data: bytes) -> int:
        """Queue *data* for sending; returns its length.  Never waits."""
        if type(data) is not bytes:
            data = bytes(data)
        if self._lost:
            return len(data)
        if self.batching:
            batch = self._batch
            if batch is None:
                self._batch = [data]
            else:
                batch.append(data)
            self._batched += len(data)
            if self._batched >= FLUSH_AT:
                self.flush()
        else:
            self._transport.write(data)
        connection = self._connection
        if connection.idle_timer is not None:
            connection.last_activity = _monotonic()
        if connection.record is not None:
            connection.record.bytes_sent += len(data)
        if self._paused:
            self._queued += len(data)
            if self._queued > self.max_buffer:
                self._batch = None
                self._transport.abortConnection()
                self._lost_now(reset=False)
                raise ConnectionAbortedError(
                    errno.ECONNABORTED,
                    f"more than max_buffer ({self.max_buffer}) bytes written while the "
                    "client was not reading, without awaiting drain(); connection aborted",
                )
        return len(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Hand what the current step wrote to the transport (the task calls
        this when a step ends; ``close()`` and ``write_eof()`` do first)."""
        batch = self._batch
        if batch:
            data = batch[0] if len(batch) == 1 else b"".join(batch)
            self._batch = None
            self._batched = 0
            if not self._lost:
                self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport takes more; several coroutines may wait at once.

        Error handling:
            ``ConnectionResetError``/``BrokenPipeError`` once the connection is
            lost; ``TimeoutError`` after the handler's ``timeout``.
        """
        while True:
            if self._lost:
                raise (
                    _reset_error() if self._reset else BrokenPipeError(errno.EPIPE, "Broken pipe")
                )
            if not self._paused:
                return
            waiter = Wait.bounded(self._connection)
            if self._drainers is None:
                self._drainers = []
            self._drainers.append(waiter)
            await waiter

    def can_write_eof(self) -> bool:
        return self._connection.half_close is not None

    def write_eof(self) -> None:
        """Half-close: the client reads EOF after what was written; reading goes on.

        Error handling:
            ``OSError(ENOTSUP)`` where the transport cannot half-close (TLS).
        """
        half_close = self._connection.half_close
        if half_close is None:
            raise OSError(errno.ENOTSUP, "this transport cannot half-close (TLS)")
        if self._lost or self._eof_written:
            return
        self.flush()
        self._eof_written = True
        if self._connection.reader.at_eof():
            # Nothing more to read either: closing says the same, in one step.
            self.close()
            return
        self._stop_producing()
        half_close()

    def close(self) -> None:
        """Close once everything written has been sent."""
        self._closing = True
        if not self._lost:
            self.flush()
            self._stop_producing()
            self._transport.loseConnection()

    def _stop_producing(self) -> None:
        """Nothing more will be written: stop being the transport's producer.

        A transport does not close (nor half-close) while a paused producer
        is registered; it waits for that producer to write again.
        """
        if self._connection.producing:
            self._connection.producing = False
            self._transport.unregisterProducer()
            self.resume()

    def is_closing(self) -> bool:
        return self._closing or self._lost

    @property
    def paused(self) -> bool:
        """Whether the transport's buffer is full (``drain()`` would wait)."""
        return self._paused

    @property
    def closed(self) -> bool:
        return self.is_closing()

    # -- called by the protocol -----------------------------------------------------------

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._queued = 0
        self._wake()

    def _lost_now(self, reset: bool) -> None:
        if not self._lost:
            self._lost = True
            self._reset = reset
            self._batch = None
            self._wake()

    def _wake(self) -> None:
        drainers = self._drainers
        if not drainers:
            return
        self._drainers = None
        for waiter in drainers:
            waiter.fire()


class DatagramWriter(io.BytesIO):
    """``wfile`` of an async datagram handler: the reply, sent by ``finish()``."""

    async def drain(self) -> None:
        """Nothing to wait for: the reply is sent whole by ``finish()``."""


class AsyncSocket:
    """``request`` of an async stream handler: the connection, socket-shaped.

    The I/O methods are coroutines (``await request.recv(4096)``) that share
    the buffers of ``reader`` (``rfile``) and ``writer`` (``wfile``); the
    others answer at once, as a socket's do.  ``close()`` and ``shutdown()``
    are plain methods because ``shutdown_request``/``close_request`` call them.
    """

    __slots__ = ("_connection", "reader", "writer", "family", "_peer", "_host", "_os_socket")

    type = socket.SOCK_STREAM

    def __init__(
        self, connection: Any, *, family: int, peer: Any, host: Any, os_socket: Any
    ) -> None:
        self._connection = connection
        self.reader: AsyncReader = connection.reader
        self.writer: AsyncWriter = connection.writer
        self.family = family
        self._peer = peer
        self._host = host
        self._os_socket = os_socket

    def __repr__(self) -> str:
        return f"<AsyncSocket peer={self._peer!r} host={self._host!r}>"

    async def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to *bufsize* bytes, waiting only if none have arrived; ``b""`` at EOF."""
        if flags:
            raise ValueError("recv() flags are not supported by an async request")
        return await self.reader.read1(bufsize)

    async def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        with memoryview(buffer) as view:
            data = await self.recv(nbytes or view.nbytes, flags)
            view[: len(data)] = data
        return len(data)

    async def send(self, data: bytes, flags: int = 0) -> int:
        await self.sendall(data, flags)
        return len(data)

    async def sendall(self, data: bytes, flags: int = 0) -> None:
        """Queue *data*, then wait until the transport can take more."""
        if flags:
            raise ValueError("send() flags are not supported by an async request")
        if self.writer.is_closing():
            raise OSError(errno.EBADF, "Bad file descriptor")
        self.writer.write(data)
        await self.writer.drain()

    @property
    def proxy_header(self) -> Any:
        """The PROXY header the connection began with (``ProxyHeader``, its
        TLVs in ``.tlvs``), or ``None``.  Read-only."""
        return self._connection.proxy_header

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The client's verified certificate, as ``ssl.SSLSocket.getpeercert``
        gives it (``None`` if it sent none); ``ValueError`` without TLS."""
        from txsocketserver._twisted.tls import TransportTLS

        return TransportTLS(self._connection.transport).getpeercert(binary_form)

    def version(self) -> str | None:
        """The TLS version negotiated, or ``None`` without TLS."""
        from txsocketserver._twisted.tls import TransportTLS

        return TransportTLS(self._connection.transport).version()

    def cipher(self) -> tuple[str, str, int] | None:
        """As ``ssl.SSLSocket.cipher()``, or ``None`` without TLS."""
        from txsocketserver._twisted.tls import TransportTLS

        return TransportTLS(self._connection.transport).cipher()

    def selected_alpn_protocol(self) -> str | None:
        """The protocol ALPN negotiated, or ``None``."""
        from txsocketserver._twisted.tls import TransportTLS

        return TransportTLS(self._connection.transport).selected_alpn_protocol()

    def getpeername(self) -> Any:
        return self._peer

    def getsockname(self) -> Any:
        if self._host is None:
            self._host = self._connection.local_address()
        return self._host

    def fileno(self) -> int:
        """The OS socket's descriptor (-1 if there is none, or it was closed)."""
        return -1 if self._os_socket is None else self._os_socket.fileno()

    def settimeout(self, timeout: float | None) -> None:
        """Seconds any read or ``drain()`` may wait before ``TimeoutError``; ``None``: no limit."""
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._connection.timeout = timeout

    def gettimeout(self) -> float | None:
        return self._connection.timeout  # type: ignore[no-any-return]

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if level == socket.IPPROTO_TCP and option == socket.TCP_NODELAY:
            set_no_delay = getattr(self._connection.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(bool(value))
                return
        if self._os_socket is None:
            raise OSError(errno.ENOTSOCK, "no OS socket under this connection")
        self._os_socket.setsockopt(level, option, value)

    def getsockopt(self, level: int, option: int, *args: Any) -> Any:
        if self._os_socket is None:
            raise OSError(errno.ENOTSOCK, "no OS socket under this connection")
        return self._os_socket.getsockopt(level, option, *args)

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``: half-close where the transport can; ``SHUT_RD``: stop
        reading; ``SHUT_RDWR``: both."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and self.writer.can_write_eof():
            self.writer.write_eof()
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self.reader.feed_eof()

    def close(self) -> None:
        """Close once everything written has been sent (``loseConnection``)."""
        self.writer.close()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def cancel_handler(self) -> None:
        """Cancel the handler at its current ``await`` (graceful stop; any thread)."""
        self._connection.cancel_handler()
