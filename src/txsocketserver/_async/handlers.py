# -*- test-case-name: tests.test_async_handlers -*-
"""The async request handler classes (no Twisted here: see ``txsocketserver._async``).

Each is the stdlib handler of the same name with ``setup``/``handle``/
``finish`` as coroutines, called in the stdlib's order on the reactor thread:
porting a handler means adding ``async`` and ``await``.
"""

from __future__ import annotations

import socket
from types import CoroutineType

from txsocketserver._core.handlers import DatagramRequestHandler

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any


class AsyncBaseRequestHandler:
    """Base class of async request handlers.

    Instantiated once per connection (stream) or datagram by the server's
    ``finish_request``; the constructor sets ``request``, ``client_address``
    and ``server``.  The server then awaits ``setup()``, ``handle()`` and
    ``finish()`` on the reactor thread; ``finish()`` runs even if ``handle()``
    raised or was cancelled.

    A handler must not block: everything between two ``await`` runs on the
    reactor thread, which every connection of the process shares.  Run
    blocking calls with ``await self.server.to_thread(function, *args)``.  A
    step that holds the reactor longer than ``blocking_warning`` seconds is
    logged (logger ``"txsocketserver"``).
    """

    # Marks the class for the servers, which pick how to serve at construction.
    _txsocketserver_async = True
    # Ours: seconds a handler may run without awaiting before a warning is logged; None: never.
    blocking_warning: float | None = 0.1

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        global _newest
        self.request = request
        self.client_address = client_address
        self.server = server
        _newest = self

    @classmethod
    def _serving_strategy(cls, server: Any) -> Any:
        """How a server with this handler class serves (asked once, when the
        server is made): on the reactor, by ``AsyncServing``."""
        from txsocketserver._async.serving import serving_for

        return serving_for(server, made_by)

    async def setup(self) -> None:
        """Called before ``handle()``."""

    async def handle(self) -> None:
        """Service the request."""

    async def finish(self) -> None:
        """Called after ``handle()``, even when it raised or was cancelled."""

    def _serve(self) -> Coroutine[Any, Any, None]:
        """The coroutine that the handler's task drives."""
        return self._setup_handle_finish()

    async def _setup_handle_finish(self) -> None:
        await self.setup()
        try:
            await self.handle()
        finally:
            await self.finish()


class AsyncStreamRequestHandler(AsyncBaseRequestHandler):
    """Async handler for stream connections: awaitable ``rfile`` and ``wfile``.

    ``connection`` (and ``request``) is the connection, with socket-shaped
    coroutines (``await self.request.recv(4096)``, ``sendall``...).  ``rfile``
    reads like a buffered binary file (``await self.rfile.readline(65537)``,
    ``async for line in self.rfile``); ``wfile.write()`` queues at once and
    ``await self.wfile.drain()`` waits while the client reads slowly.
    """

    # Bytes rfile buffers before the transport stops reading; -1: the default (64 KiB).
    rbufsize = -1
    # Unused: wfile.write() always queues at once (what a buffer would be for).
    wbufsize = 0
    # Seconds any one read or drain() may wait before TimeoutError; None: no limit.
    timeout: float | None = None
    # Set TCP_NODELAY, so small writes are not held back by Nagle's algorithm.
    disable_nagle_algorithm = False
    # Ours: bytes written while the client does not read, without awaiting
    # drain(), before the connection is aborted (ConnectionAbortedError).
    max_write_buffer = 4 * 1024 * 1024

    async def setup(self) -> None:
        self._setup_streams()

    def _setup_streams(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.reader
        if self.rbufsize > 0:
            self.rfile.limit = self.rbufsize
        self.wfile = self.connection.writer
        self.wfile.max_buffer = self.max_write_buffer

    async def finish(self) -> None:
        """Nothing to flush: ``close_request`` sends what is queued, then closes."""

    def _serve(self) -> Coroutine[Any, Any, None]:  # type: ignore[override]
        # A handler that keeps this class's setup() and finish() (most do)
        # is set up now, and its task drives handle() alone: the same order
        # and outcome, without the coroutine around the three, which would
        # stay alive beside handle()'s for the whole connection (208 bytes
        # of every idle one) and be one more level for every resumption.
        cls = type(self)
        if cls.setup is not _STREAM_SETUP or cls.finish is not _STREAM_FINISH:
            return super()._serve()
        try:
            self._setup_streams()
            coroutine = self.handle()
        except BaseException as error:  # noqa: BLE001 (raised at the first step instead)
            return _raising(error)
        if type(coroutine) is not CoroutineType:
            return _awaiting(coroutine)  # not a coroutine: awaiting it says so
        return coroutine  # type: ignore[no-any-return]


_STREAM_SETUP = AsyncStreamRequestHandler.setup
_STREAM_FINISH = AsyncStreamRequestHandler.finish


async def _raising(error: BaseException) -> None:
    raise error


async def _awaiting(awaitable: Any) -> None:
    await awaitable


class AsyncDatagramRequestHandler(AsyncBaseRequestHandler):
    """Async handler for datagrams.

    ``request`` is ``(data, socket)``; ``packet`` and ``socket`` are its parts.
    ``rfile`` reads the datagram with the stream reader's coroutines; what is
    written to ``wfile`` is sent back to ``client_address`` in one datagram
    by ``finish()``, as ``DatagramRequestHandler`` does.
    """

    async def setup(self) -> None:
        from txsocketserver._async.streams import AsyncReader, DatagramWriter

        self.packet, self.socket = self.request
        self.rfile = AsyncReader(data=self.packet)
        self.wfile = DatagramWriter()

    async def finish(self) -> None:
        DatagramRequestHandler.finish(self)  # type: ignore[arg-type]


# The async handler made last: read back by made_by() (reactor thread).
_newest: AsyncBaseRequestHandler | None = None


def made_by(finish_request: Any, request: Any, client_address: Any) -> Any:
    """The async handler that ``finish_request(request, client_address)``
    made, or ``None``: the hook instantiates the handler class and returns
    nothing.  Reactor thread only."""
    global _newest
    _newest = None
    finish_request(request, client_address)
    handler, _newest = _newest, None
    return handler


def is_async_handler(handler_class: Any) -> bool:
    """Whether *handler_class* is an async handler class (served on the reactor)."""
    return bool(getattr(handler_class, "_txsocketserver_async", False))


__all__ = [
    "AsyncBaseRequestHandler",
    "AsyncDatagramRequestHandler",
    "AsyncStreamRequestHandler",
    "is_async_handler",
]
