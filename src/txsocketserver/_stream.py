"""Stream servers: the listening socket, made exactly as the stdlib makes it.

The socket is created, bound and listened to by the stdlib's hooks in the
stdlib's order, so subclasses that set options in ``server_bind`` or change
``server_activate`` keep working; only waiting for connections is handed to
the reactor (see ``_readiness``).  Handlers receive the real accepted socket:
stdlib handlers call ``makefile``, ``setsockopt`` or ``ssl.wrap_socket`` on it,
and the bytes never cross a thread.
"""

from __future__ import annotations

import socket
from typing import Any

from txsocketserver._base import BaseServer


class TCPServer(BaseServer):
    """Base class for various socket-based server classes.

    Defaults to synchronous IP stream (i.e., TCP): one request at a time, the
    others waiting in the kernel's listen backlog.

    Args:
        server_address: ``(host, port)``; port 0 picks a free port, read back
            from ``server_address`` after binding.
        RequestHandlerClass: called as ``RequestHandlerClass(request,
            client_address, server)`` for each connection.
        bind_and_activate: when false, the caller must call ``server_bind()``
            and ``server_activate()`` itself (after setting socket options, say).

    Error handling:
        Binding errors (``OSError`` with ``EADDRINUSE``, ``socket.gaierror`` for
        a bad host) propagate from the constructor after the socket is closed.
    """

    address_family = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    # listen() backlog: connections the kernel queues while every handler is busy.
    request_queue_size = 5
    # Set SO_REUSEADDR before bind (restart without waiting out TIME_WAIT).
    allow_reuse_address = False
    # Set SO_REUSEPORT before bind (several processes sharing one port).
    allow_reuse_port = False

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
    ) -> None:
        """Constructor.  May be extended, do not override."""
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Called by the constructor to bind the socket.  May be overridden."""
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Called by the constructor to activate the server.  May be overridden."""
        self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Called to clean up the server.  May be overridden."""
        self._stop_watching()
        self.socket.close()

    def fileno(self) -> int:
        """Return the socket's file descriptor (what the reactor watches)."""
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Get the request and client address from the socket.  May be
        overridden (to wrap the accepted socket in TLS, for instance)."""
        return self.socket.accept()

    def shutdown_request(self, request: Any) -> None:
        """Called to shutdown and close an individual request."""
        try:
            # Half-close first so the client sees EOF after every byte written,
            # even if something else still holds the socket open.
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""
        request.close()


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer):
        """A stream server on a Unix socket path (the path must not exist yet)."""

        address_family = socket.AF_UNIX


__all__ = ["TCPServer"] + (["UnixStreamServer"] if hasattr(socket, "AF_UNIX") else [])
