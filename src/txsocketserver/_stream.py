"""Stream servers: the listening socket, made exactly as the stdlib makes it.

The socket is created, bound and listened to by the stdlib's hooks in the
stdlib's order, so subclasses that set options in ``server_bind`` or change
``server_activate`` keep working; only waiting for connections is handed to
the reactor (see ``_readiness``).  Handlers receive the real accepted socket:
stdlib handlers call ``makefile``, ``setsockopt`` or ``ssl.wrap_socket`` on it,
and the bytes never cross a thread.

Given a Twisted endpoint as its address (``txsocketserver.Endpoint`` or, for
the TCP family, a ``str`` containing ``":"``), a stream server owns an
``EndpointListener`` instead of a socket and the same hooks take their
connections from it (see ``_endpoints``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from txsocketserver._base import BaseServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any

    from txsocketserver._async.serving import AsyncServing
    from txsocketserver._endpoints import EndpointListener
    from txsocketserver._readiness import IRequestReadiness


def _remove_socket_file(path: str) -> None:
    """Remove *path* if it is a socket file (never any other kind of file)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)


def _check_handler_class(server: Any, handler_class: Any) -> bool:
    """Whether *handler_class* is async (served on the reactor); ``TypeError``
    for a handler the server cannot run."""
    from txsocketserver._async.handlers import is_async_handler
    from txsocketserver._forking import ForkingMixIn
    from txsocketserver._threading import ThreadingMixIn

    if is_async_handler(handler_class):
        for mixin in (ThreadingMixIn, ForkingMixIn):
            if isinstance(server, mixin):
                raise TypeError(
                    f"{type(server).__name__} is a {mixin.__name__} server, and "
                    f"{handler_class.__name__} is an async handler: async handlers run on "
                    "the reactor thread, not on threads or in processes. Serve it with "
                    f"{'UDPServer' if server.socket_type == socket.SOCK_DGRAM else 'TCPServer'}"
                    " (or UnixStreamServer, UnixDatagramServer)."
                )
        return True
    import inspect

    if inspect.iscoroutinefunction(getattr(handler_class, "handle", None)):
        raise TypeError(
            f"{handler_class.__name__}.handle is a coroutine function, but the class is not "
            "an async handler: derive it from txsocketserver.AsyncStreamRequestHandler "
            "(or AsyncBaseRequestHandler, AsyncDatagramRequestHandler)."
        )
    return False


class TCPServer(BaseServer):
    """Base class for various socket-based server classes.

    Defaults to synchronous IP stream (i.e., TCP): one request at a time, the
    others waiting in the kernel's listen backlog.

    Args:
        server_address: ``(host, port)``; port 0 picks a free port, read back
            from ``server_address`` after binding.  Or a Twisted server
            endpoint: ``txsocketserver.Endpoint("ssl:8443:...")`` or a ``str``
            description such as ``"tcp:8000"`` (endpoint mode: see
            ``docs/twisted.md``; ``request`` is then a ``TransportSocket``,
            ``socket`` is ``None`` and ``server_address`` the listening address).
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
    _serves_async_handlers = True
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
        # Imported here, not with the class: it imports Twisted, which a
        # process that only defines the class (a forking worker) never needs.
        from txsocketserver._endpoints import EndpointListener, as_endpoint, listening_socket

        BaseServer.__init__(self, server_address, RequestHandlerClass)
        # How an async handler class is served (see txsocketserver._async); None for the others.
        self._async: AsyncServing | None = None
        serve_async = _check_handler_class(self, RequestHandlerClass)
        self._endpoint: EndpointListener | None = None
        # Set for tcp:, tcp6:, unix: and ssl: endpoints, which are served on
        # a socket of our own (see _endpoints.listening_socket).
        self._endpoint_socket = False
        self._tls: ssl.SSLContext | None = None
        self._unix_mode: int | None = None
        self._unix_lock_wanted = False
        self._unix_lock: Any = None
        self._unix_bound = False  # a unix: endpoint's socket file is ours to remove
        endpoint = as_endpoint(server_address, self.address_family)
        listening = None
        if endpoint is not None and self.socket_type == socket.SOCK_STREAM:
            listening = listening_socket(endpoint)
        if listening is not None and serve_async and listening.tls is not None:
            # Async handlers run on the reactor: Twisted does their TLS there.
            listening = None
        if listening is not None:
            # An endpoint that is just a listening socket is served as one:
            # the stdlib's hooks bind and accept it, handlers get real sockets.
            self.server_address = listening.address
            self.address_family = listening.family
            self.request_queue_size = listening.backlog
            self._tls = listening.tls
            self._unix_mode = listening.unix_mode
            self._unix_lock_wanted = listening.unix_lock
            self._endpoint_socket = True
            endpoint = None
        if endpoint is None:
            self.socket = socket.socket(self.address_family, self.socket_type)
        elif self.socket_type != socket.SOCK_STREAM:
            raise TypeError(f"{type(self).__name__} cannot serve a stream endpoint ({endpoint!r})")
        else:
            self.socket = None  # type: ignore[assignment]
            if not serve_async:
                self._endpoint = EndpointListener(endpoint, backlog=self.request_queue_size)
        if serve_async:
            from txsocketserver._async.serving import AsyncEndpointListener, AsyncServing

            self._async = AsyncServing(self)
            if endpoint is not None:
                self._endpoint = AsyncEndpointListener(
                    endpoint, backlog=self.request_queue_size, serving=self._async
                )
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Called by the constructor to bind the socket.  May be overridden.

        In endpoint mode: listen on the endpoint (it binds and listens in one
        step), then set ``server_address`` and ``address_family`` from it.
        """
        if self._endpoint is not None:
            self._endpoint.listen()
            self._endpoint_listening()
            return
        # Twisted's TCP ports always reuse the address, so endpoints do too.
        reuse_address = self.allow_reuse_address or (
            self._endpoint_socket and self.address_family != getattr(socket, "AF_UNIX", None)
        )
        if reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self._unix_lock_wanted:
            self._lock_unix_path()
        self.socket.bind(self.server_address)
        if self._unix_mode is not None and not self.server_address.startswith("\0"):
            self._unix_bound = True
            os.chmod(self.server_address, self._unix_mode)
        self.server_address = self.socket.getsockname()

    def _lock_unix_path(self) -> None:
        """What Twisted does for ``unix:PATH`` with ``lockfile=1`` (its
        default): hold ``PATH.lock``, and remove a socket file that a dead
        process left behind."""
        from twisted.python.lockfile import FilesystemLock

        path = self.server_address
        lock = FilesystemLock(f"{path}.lock")
        if not lock.lock():
            raise OSError(errno.EADDRINUSE, f"{path}.lock is held by another process", path)
        self._unix_lock = lock
        if not lock.clean:
            _remove_socket_file(path)

    def server_activate(self) -> None:
        """Called by the constructor to activate the server.  May be overridden."""
        if self._endpoint is not None:
            return  # the endpoint listened in server_bind()
        self.socket.listen(self.request_queue_size)

    def server_close(self) -> None:
        """Called to clean up the server.  May be overridden.

        A ``unix:`` endpoint's socket file (and lock file) are removed, as
        Twisted removes them; a plain path is left, as the stdlib leaves it.
        """
        self._stop_watching()
        if self._async is not None:
            self._async.close()
        if self._endpoint is not None:
            self._endpoint.close()
            return
        self.socket.close()
        if self._unix_bound:
            self._unix_bound = False
            _remove_socket_file(self.server_address)
        if self._unix_lock is not None:
            self._unix_lock.unlock()
            self._unix_lock = None

    def fileno(self) -> int:
        """Return the socket's file descriptor (what the reactor watches).

        In endpoint mode, a descriptor that is readable while an accepted
        connection waits for ``get_request()`` (Twisted accepts on the
        listening socket, so that one would not tell).
        """
        if self._endpoint is not None:
            return self._endpoint.fileno()
        return self.socket.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Get the request and client address from the socket.  May be
        overridden (to wrap the accepted socket in TLS, for instance).

        In endpoint mode: the next connection Twisted accepted, as
        ``(TransportSocket, client_address)``.
        """
        if self._endpoint is not None:
            return self._endpoint.take()
        request, client_address = self.socket.accept()
        if self._tls is not None:
            from txsocketserver import _tls

            try:
                request = _tls.wrap(self._tls, request)
            except BaseException:
                request.close()
                raise
        return request, client_address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating RequestHandlerClass.

        On an ``ssl:`` endpoint the TLS handshake happens here first, in the
        thread that runs the request, bounded by the handler class's
        ``timeout``; a client that leaves or stalls during it is not an error.
        """
        if self._tls is not None:
            from txsocketserver import _tls

            if not _tls.handshake(request, getattr(self.RequestHandlerClass, "timeout", None)):
                return
        super().finish_request(request, client_address)

    def handle_request(self) -> None:
        """Handle one request, waiting at most ``timeout`` seconds for it.

        With an async handler class: accept one request and start its
        handler on the reactor, then return (as a threading server returns
        once the request runs on its thread).
        """
        if self._async is None:
            return super().handle_request()
        self._async.once = True
        try:
            return super().handle_request()
        finally:
            self._async.once = False

    def _handle_request_noblock(self) -> None:
        if self._async is None:
            super()._handle_request_noblock()
        # Otherwise the reactor has taken the request already (see _async).

    def process_request(self, request: Any, client_address: Any) -> None:
        """Call ``finish_request``, then ``shutdown_request``.

        With an async handler class (on the reactor thread): ``finish_request``
        makes the handler, whose coroutines then run; ``shutdown_request``
        follows when they have ended.
        """
        if self._async is None:
            return super().process_request(request, client_address)
        self._async.process_request(request, client_address)

    def to_thread(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Ours, for async handlers: ``await self.server.to_thread(fn, *args)``.

        Runs ``function(*args, **kwargs)`` on a thread pool of the server's own
        (at most ``max_threads`` threads if the server sets it, else 10) and
        returns a Deferred of its result.  Call it on the reactor thread.

        Error handling:
            The function's exception is raised at the ``await``; ``TypeError``
            for a server whose handler class is not async.
        """
        if self._async is None:
            raise TypeError("to_thread() is for servers with an async handler class")
        return self._async.to_thread(function, *args, **kwargs)

    def _request_readiness(self) -> IRequestReadiness:
        if self._async is not None:
            return self._async.readiness()
        if self._endpoint is not None:
            return self._endpoint.readiness()
        return super()._request_readiness()

    def _endpoint_listening(self) -> None:
        """Reflect the endpoint's listening address (called once it listens)."""
        assert self._endpoint is not None
        self.server_address = self._endpoint.host
        self.address_family = self._endpoint.family  # type: ignore[assignment]

    def shutdown_request(self, request: Any) -> None:
        """Called to shutdown and close an individual request."""
        if self._tls is not None:
            from txsocketserver import _tls

            _tls.send_close_notify(request)
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
