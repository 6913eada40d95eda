# -*- test-case-name: tests.test_stream_basic,tests.test_stream_errors -*-
"""Stream servers: ``TCPServer`` and ``UnixStreamServer``, hook for hook the stdlib's.

Each hook does the stdlib's work through three strategies the server is given
once, when it is made (``_twisted.strategies.strategies_for``): its *serving*
(the serving thread takes the requests, or the reactor does, for an async
handler class), its *listener* (its own socket, made, bound and accepted
exactly as the stdlib does; or a Twisted endpoint) and its *connection
security* (nothing, or TLS for an ``ssl:`` description).  The hooks delegate
to them and test no mode.  This module is part of the Twisted-free core.  See
``docs/architecture.md``.
"""

from __future__ import annotations

import socket

from txsocketserver._core import lifecycle
from txsocketserver._core.base import BaseServer, twisted_side

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from txsocketserver._core.base import IRequestReadiness


class PlainConnections:
    """Connection security of a server without TLS: nothing to do.

    A class attribute of every stream server, so that the server object a
    forking server's worker rebuilds has it without importing anything.
    """

    def wrap(self, request: Any) -> Any:
        return request

    def establish(self, request: Any, handler_class: Any) -> bool:
        return True

    def end(self, request: Any) -> None:
        pass


_PLAIN = PlainConnections()


class ServingThread:
    """The serving of a server with a plain handler class: the serving thread
    takes each request and runs it through ``BaseServer``'s template method.

    Stateless, and a class attribute of every stream server, so that the
    server object a forking server's child rebuilds has it without importing
    anything.  Its methods are ``BaseServer``'s own, so delegating to them
    costs the hooks nothing.
    """

    take_request = staticmethod(BaseServer._handle_request_noblock)
    process_request = staticmethod(BaseServer.process_request)
    # What the server sets when it is given this serving: nothing.
    server_settings: dict[str, Any] = {}
    # An ssl: description's TLS is done in the request's own thread.
    tls_in_request = True

    def readiness(self, server: Any, once: bool) -> IRequestReadiness:
        return server._listener.readiness()  # type: ignore[no-any-return]

    def endpoint_listener(self, endpoint: Any, *, backlog: int, server: Any) -> Any:
        """Connections accepted by Twisted, queued for the serving thread."""
        return twisted_side().endpoint_listener(endpoint, backlog=backlog, server=server)

    def to_thread(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("to_thread() is for servers with an async handler class")

    def close(self) -> None:
        pass


_SERVING_THREAD = ServingThread()


class RequestProcessListener:
    """The listener of a forked request's copy of the server (``ForkingMixIn``).

    The serving process's listener stays there (``_serving_process_only``):
    what it holds acts on that process's resources (a ``unix:`` socket file to
    remove, a lock, an endpoint).  In the request's process, ``server_close()``
    closes that process's copy of the socket and nothing else, as after
    ``os.fork``; serving from there is refused.
    """

    stops_at_once = False

    def __init__(self, server: Any) -> None:
        self._server = server

    def close(self) -> None:
        if self._server.socket is not None:
            self._server.socket.close()

    def fileno(self) -> int:
        return self._server.socket.fileno()

    def _refuse(self, *args: object) -> Any:
        raise RuntimeError("a forked request's copy of the server does not listen or serve")

    bind = activate = accept = readiness = start_listening = stop_accepting = _refuse
    wait_accepted_taken = _refuse


def _check_handler_class(server: Any, handler_class: Any) -> bool:
    """Whether *handler_class* is async (served on the reactor); ``TypeError``
    for a handler the server cannot run."""
    from txsocketserver._core.forking_mixin import ForkingMixIn
    from txsocketserver._core.threading_mixin import ThreadingMixIn

    if getattr(handler_class, "_txsocketserver_async", False):
        kind = server.socket_type
        for mixin in (ThreadingMixIn, ForkingMixIn):
            if isinstance(server, mixin):
                raise TypeError(
                    f"{type(server).__name__} is a {mixin.__name__} server, and "
                    f"{handler_class.__name__} is an async handler: async handlers run on "
                    "the reactor thread, not on threads or in processes. Serve it with "
                    f"{'UDPServer' if kind == socket.SOCK_DGRAM else 'TCPServer'}"
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
            endpoint: ``txsocketserver.Endpoint("haproxy:tcp:8000")`` or, for
            the TCP family, a ``str`` description such as ``"tcp:8000"`` (see
            ``docs/twisted.md``: ``tcp:``, ``tcp6:``, ``unix:`` and ``ssl:``
            are served on a socket of the server's own, anything else through
            Twisted, with a socket facade as ``request`` and ``socket`` None).
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
    # Ours, for PROXY-protocol endpoints (haproxy:...): the peers whose header
    # is believed, as addresses or networks ("10.0.0.0/8"; "*" for any).  A
    # header from any other peer could claim any client address, so its
    # connection is refused and logged.  Loopback only by default.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Ours: seconds from accept for the PROXY header to arrive; None: no limit.
    header_timeout: float | None = 10.0
    # The listening (or datagram) socket; None when Twisted listens for us.
    socket: socket.socket
    # Private: how connections arrive (an IListener); a forked request's copy
    # of the server gets a RequestProcessListener instead.
    _listener: Any
    _serving_process_only: tuple[str, ...] = ("_listener", "_serving")
    # Private: what each connection needs around its handler (TLS for ssl:).
    _security: Any = _PLAIN
    # Private: who takes the requests and runs them (an IServing).
    _serving: Any = _SERVING_THREAD

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: Any,
        bind_and_activate: bool = True,
    ) -> None:
        """Constructor.  May be extended, do not override."""
        BaseServer.__init__(self, server_address, RequestHandlerClass)
        _check_handler_class(self, RequestHandlerClass)
        # Here, not at import: the Twisted side loads when a server is made,
        # never in a process that only defines the class (a forking child).
        chosen = twisted_side().strategies_for(self, _SERVING_THREAD, _PLAIN)
        for name, value in chosen.settings.items():
            setattr(self, name, value)
        self._serving = chosen.serving
        self._listener = chosen.listener
        self._security = chosen.security
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Called by the constructor to bind the socket.  May be overridden.

        Sets ``SO_REUSEADDR``/``SO_REUSEPORT`` as ``allow_reuse_address`` and
        ``allow_reuse_port`` say, binds, and sets ``server_address`` to the
        bound address (an endpoint listens here, in one step).
        """
        self._listener.bind()

    def server_activate(self) -> None:
        """Called by the constructor to activate the server.  May be overridden."""
        self._listener.activate()

    def server_close(self) -> None:
        """Called to clean up the server.  May be overridden.

        A ``unix:`` endpoint's socket file (and lock file) are removed, as
        Twisted removes them; a plain path is left, as the stdlib leaves it.
        """
        self._stop_watching()
        self._serving.close()
        self._listener.close()

    def fileno(self) -> int:
        """Return the socket's file descriptor (what the reactor watches).

        Served through Twisted, a descriptor that is readable while an
        accepted connection waits for ``get_request()``.
        """
        return self._listener.fileno()

    def get_request(self) -> tuple[Any, Any]:
        """Get the request and client address from the socket.  May be
        overridden (to wrap the accepted socket in TLS, for instance).

        Served through Twisted: the next connection Twisted accepted, as
        ``(socket facade, client_address)``.
        """
        request, client_address = self._listener.accept()
        return self._security.wrap(request), client_address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating RequestHandlerClass.

        On an ``ssl:`` endpoint the TLS handshake happens here first, in the
        thread that runs the request, bounded by ``handshakeTimeout`` (or the
        handler class's ``timeout`` if shorter); a client that leaves, stalls
        or cannot agree on TLS is not a handler error (it is logged).
        """
        try:
            established = self._security.establish(request, self.RequestHandlerClass)
        except Exception:
            # A client that does not speak TLS: handle_error reports it.
            if self._observers:
                self._request_refused(request, lifecycle.TLS_HANDSHAKE)
            raise
        if established:
            super().finish_request(request, client_address)
        elif self._observers:
            self._request_refused(request, lifecycle.TLS_HANDSHAKE)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Handle an error raised by a handler (see ``BaseServer.handle_error``).

        On the Twisted-endpoint path, a connection that ended before sending a
        single byte of payload (a load balancer's TCP health check, a port
        scanner) is not a failed request: it gets one debug-level log line
        instead of a traceback.
        """
        if getattr(request, "ended_before_payload", False):
            from twisted.logger import Logger

            Logger(namespace="txsocketserver").debug(
                "connection from {client_address} ended before sending anything",
                client_address=client_address,
            )
            return
        super().handle_error(request, client_address)

    def _handle_request_noblock(self) -> None:
        # With an async handler class the reactor has taken the request already.
        self._serving.take_request(self)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Call ``finish_request``, then ``shutdown_request``.

        With an async handler class (on the reactor thread): ``finish_request``
        makes the handler, whose coroutines then run; ``shutdown_request``
        follows when they have ended.
        """
        self._serving.process_request(self, request, client_address)

    def to_thread(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Ours, for async handlers: ``await self.server.to_thread(fn, *args)``.

        Runs ``function(*args, **kwargs)`` on a thread pool of the server's own
        (at most ``max_threads`` threads if the server sets it, else 10) and
        returns a Deferred of its result.  Call it on the reactor thread.

        Error handling:
            The function's exception is raised at the ``await``; ``TypeError``
            for a server whose handler class is not async.
        """
        return self._serving.to_thread(function, *args, **kwargs)

    def shutdown_request(self, request: Any) -> None:
        """Called to shutdown and close an individual request."""
        self._security.end(request)
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

    # -- private: the serving loop and a service reach the listener here ----------

    def _rebuilt_in_request_process(self) -> None:
        self._listener = RequestProcessListener(self)

    def _request_readiness(self, once: bool = False) -> IRequestReadiness:
        return self._serving.readiness(self, once)  # type: ignore[no-any-return]

    def _start_listening(self) -> Any:
        return self._listener.start_listening()

    def _accepted_record(self, request: Any, client_address: Any) -> Any:
        # A listener that reads a PROXY header before the request is a plain
        # socket (a forking server's, _twisted/proxied_sockets.py) keeps the
        # record it made at accept, which a socket cannot carry.
        take_record = getattr(self._listener, "take_record", None)
        record = take_record(request) if take_record is not None else None
        if record is not None:
            return record
        return super()._accepted_record(request, client_address)

    def _stop_accepting(self) -> None:
        self._listener.stop_accepting()

    def _wait_accepted_taken(self, timeout: float) -> bool:
        return bool(self._listener.wait_accepted_taken(timeout))

    @property
    def _stops_accepting_at_once(self) -> bool:
        return bool(self._listener.stops_at_once)


if hasattr(socket, "AF_UNIX"):

    class UnixStreamServer(TCPServer):
        """A stream server on a Unix socket path (the path must not exist yet)."""

        address_family = socket.AF_UNIX


__all__ = ["TCPServer"] + (["UnixStreamServer"] if hasattr(socket, "AF_UNIX") else [])
