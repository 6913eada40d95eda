# -*- test-case-name: tests.test_stream_builtin_handlers,tests.test_stream_api -*-
"""Request handler classes: one instance per connection (stream) or datagram.

A handler is plain blocking code.  It never learns whether its server runs on a
reactor: ``request`` is the real accepted socket for socket servers, and a
socket-like bridge to a Twisted transport for endpoint servers.  Handlers
written against the stdlib's ``socketserver.BaseRequestHandler`` work on our
servers too, since all they use is ``request``, ``client_address`` and
``server``.
"""

from __future__ import annotations

import _thread
import io
import socket
import weakref

from txsocketserver._core.base import log_warning

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class BaseRequestHandler:
    """Base class for request handler classes.

    Instantiated once per request: the constructor sets ``request``,
    ``client_address`` and ``server``, then calls ``setup()``, ``handle()`` and
    ``finish()``; ``finish()`` runs even if ``handle()`` raises.  Override
    ``handle()`` to service the request.
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        """Called before ``handle()``."""

    def handle(self) -> None:
        """Service the request."""

    def finish(self) -> None:
        """Called after ``handle()``, even when it raised."""


class StreamRequestHandler(BaseRequestHandler):
    """Handler for stream sockets: ``rfile`` and ``wfile`` file objects.

    ``connection`` is the socket; ``rfile`` reads from it (buffered by
    ``rbufsize``), ``wfile`` writes to it (unbuffered by default, so every
    ``write`` is sent at once).
    """

    # Buffer size of rfile; -1 means the default (buffered) size.
    rbufsize = -1
    # Buffer size of wfile; 0 means unbuffered: each write() goes out at once.
    wbufsize = 0
    # Socket timeout in seconds for the whole connection; None means none.
    # A read or write that takes longer raises TimeoutError in the handler.
    timeout: float | None = None
    # Set TCP_NODELAY, so small writes are not held back by Nagle's algorithm.
    disable_nagle_algorithm = False

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile: io.BufferedIOBase = _SocketWriter(self.connection)
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                # The client went away: there is nobody left to send to.
                pass
        self.wfile.close()
        self.rfile.close()


class _SocketWriter(io.BufferedIOBase):
    """An unbuffered write-only file that sends each write with ``sendall``.

    ``makefile('wb', 0)`` would give a raw stream whose ``write`` may send only
    part of the data; handlers expect every byte written to go out.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


# What recvfrom() returns as the address of an unbound Unix datagram socket:
# None on Linux, '' on some other systems.  Nothing can be sent to it.
_NO_ADDRESS = (None, "", b"")

# Servers that have already logged the dropped-reply warning (once each);
# the lock makes "once" hold when several handler threads drop replies at once.
_warned_no_address: weakref.WeakSet[Any] = weakref.WeakSet()
_warned_lock = _thread.allocate_lock()


class DatagramRequestHandler(BaseRequestHandler):
    """Handler for datagram sockets.

    ``request`` is ``(data, socket)``.  ``rfile`` reads the datagram (also in
    ``packet``); whatever is written to ``wfile`` is sent back to
    ``client_address`` in one datagram by ``finish()`` (an empty datagram if
    nothing was written, as in the stdlib).

    Error handling:
        A client on an unbound Unix datagram socket has no address
        (``client_address`` is ``None`` or ``''``), so no reply can reach it.
        ``finish()`` then sends nothing; if the handler wrote a reply, a
        warning is logged (logger ``"txsocketserver"``, once per server).  The
        stdlib's ``finish()`` raises ``TypeError``/``OSError`` there instead,
        which reaches ``handle_error()`` for every such datagram.
    """

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        reply = self.wfile.getvalue()
        if self.client_address in _NO_ADDRESS:
            if reply and _first_warning_for(self.server):
                log_warning(
                    "%s: a %d-byte reply was dropped: the client sent from an unbound "
                    "Unix socket, which has no address to reply to (the client must "
                    "bind its socket to a path to receive replies).",
                    type(self).__name__,
                    len(reply),
                )
            return
        self.socket.sendto(reply, self.client_address)


def _first_warning_for(server: Any) -> bool:
    with _warned_lock:
        try:
            if server in _warned_no_address:
                return False
            _warned_no_address.add(server)
        except TypeError:
            pass  # not weakly referenceable: warn every time rather than never
        return True
