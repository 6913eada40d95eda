# -*- test-case-name: tests.test_listeners,tests.test_connection_cap -*-
"""``SocketListener``: the :class:`IListener` of a server with a socket of its own.

A socket address, or an endpoint that is nothing but a listening socket
(``tcp:``, ``tcp6:``, ``unix:``, ``ssl:``), is served on the server's own
socket, bound and listened to in the stdlib's order, accepted by
``get_request()``.  ``_twisted.strategies`` chooses it (or an endpoint
listener, where Twisted accepts); ``docs/architecture.md`` tells the story.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Any

from zope.interface import implementer

from txsocketserver._twisted.interfaces import IListener, IRequestReadiness


def remove_socket_file(path: str) -> None:
    """Remove *path* if it is a socket file (never any other kind of file)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)


def listen_backlog(server: Any) -> int:
    """How many connections the kernel may queue for *server* (the ``listen()``
    backlog).

    ``request_queue_size``, as in the stdlib; with ``max_connections`` set, at
    least ``socket.SOMAXCONN`` (which the kernel bounds by its own limit,
    ``net.core.somaxconn`` on Linux).  At the cap the server stops accepting,
    and every client beyond it waits in the kernel, holding no descriptor or
    memory of the server's, until a connection ends; with the stdlib's 5 the
    kernel's queue overflows at once and clients are dropped (their handshake
    retried seconds later, or reset).
    """
    size: int = server.request_queue_size
    if getattr(server, "max_connections", None) is not None:
        size = max(size, socket.SOMAXCONN)
    return size


@implementer(IListener)
class SocketListener:
    """The server's own socket (``server.socket``), as the stdlib has it.

    Args:
        server: the server it listens for.
        reuse_address: set ``SO_REUSEADDR`` even if ``allow_reuse_address``
            is false (``tcp:`` descriptions, as Twisted's ports).
        unix_mode: permissions for a ``unix:`` description's socket file,
            which is then the server's to remove on close.
        unix_lock: hold ``PATH.lock`` as Twisted's ``unix:`` (``lockfile=1``)
            does, removing a socket file that a dead process left.
        from_endpoint: made for an endpoint description, which
            ``start_server`` binds if the server was made unbound.
    """

    stops_at_once = False
    #: What makes the serving thread's readiness (``fd, holder=``) instead of
    #: ``SocketReadiness``: a ``--workers`` worker sets it for a socket it
    #: shares with the other workers (``_workers.exclusive_accept``).
    make_readiness: Any = None

    def __init__(
        self,
        server: Any,
        *,
        reuse_address: bool = False,
        unix_mode: int | None = None,
        unix_lock: bool = False,
        from_endpoint: bool = False,
        options: Any = None,
    ) -> None:
        self._server = server
        # endpoints.ListenerOptions: ipv6only=, a Unix socket's owner and group.
        self._options = options
        self._reuse_address = reuse_address
        self._unix_mode = unix_mode
        self._unix_lock_wanted = unix_lock
        # The listening socket whose (family, type, proto) are in _kind.
        self._kind_of: Any = None
        self._kind: tuple[int, int, int] = (0, 0, 0)
        self._unix_lock: Any = None
        self._unix_bound = False  # the socket file is ours to remove
        # A description's socket, made with bind_and_activate=False, is bound
        # by start_server; a socket address is bound by its caller.
        self._from_endpoint = from_endpoint
        self._backlog: int | None = None  # what activate() listened with

    def bind(self) -> None:
        server = self._server
        sock = server.socket
        reuse_address = server.allow_reuse_address or self._reuse_address
        if reuse_address and hasattr(socket, "SO_REUSEADDR"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if server.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        options = self._options
        if options is not None and options.ipv6_only is not None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(options.ipv6_only))
        if self._unix_lock_wanted:
            self._lock_unix_path(server.server_address)
        sock.bind(server.server_address)
        if self._unix_mode is not None and not server.server_address.startswith("\0"):
            self._unix_bound = True
            os.chmod(server.server_address, self._unix_mode)
            if options is not None and (options.owner, options.group) != (-1, -1):
                os.chown(server.server_address, options.owner, options.group)
        server.server_address = sock.getsockname()

    def _lock_unix_path(self, path: str) -> None:
        from twisted.python.lockfile import FilesystemLock

        lock = FilesystemLock(f"{path}.lock")
        if not lock.lock():
            raise OSError(errno.EADDRINUSE, f"{path}.lock is held by another process", path)
        self._unix_lock = lock
        if not lock.clean:
            remove_socket_file(path)

    def activate(self) -> None:
        self._backlog = listen_backlog(self._server)
        self._server.socket.listen(self._backlog)

    def _widen_backlog(self) -> None:
        # max_connections may be set on the server after it listened.
        if self._backlog is not None and listen_backlog(self._server) > self._backlog:
            self._backlog = listen_backlog(self._server)
            self._server.socket.listen(self._backlog)

    def accept(self) -> tuple[Any, Any]:
        """What ``socket.accept()`` does, without turning the listening
        socket's family and type into enums for every connection (half the
        cost of the call in Python; the accepted socket's own ``family`` and
        ``type`` are still enums).  A socket of another class (an
        ``ssl.SSLSocket`` a subclass wrapped its socket in, say) is asked
        with its own ``accept()``."""
        sock = self._server.socket
        if type(sock) is not socket.socket:
            return sock.accept()  # type: ignore[no-any-return]
        if self._kind_of is not sock:
            self._kind_of = sock
            self._kind = (int(sock.family), int(sock.type), sock.proto)
        family, kind, proto = self._kind
        fd, address = sock._accept()  # type: ignore[attr-defined]
        accepted = socket.socket(family, kind, proto, fileno=fd)
        if socket.getdefaulttimeout() is None and sock.gettimeout():
            accepted.setblocking(True)
        return accepted, address

    def fileno(self) -> int:
        return self._server.socket.fileno()

    def readiness(self) -> IRequestReadiness:
        from txsocketserver._twisted.readiness import SocketReadiness

        self._widen_backlog()
        # fileno() through the server: a subclass may override it.  The
        # listener holds the reactor from the first serving call until closed.
        if self.make_readiness is not None:
            return self.make_readiness(self._server.fileno(), holder=self)  # type: ignore[no-any-return]
        return SocketReadiness(self._server.fileno(), holder=self)

    def start_listening(self) -> Any:
        sock = self._server.socket
        if not self._from_endpoint or sock.fileno() == -1:
            return None
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        from twisted.internet.defer import maybeDeferred

        def bind_and_activate() -> None:
            self._server.server_bind()
            self._server.server_activate()

        return maybeDeferred(bind_and_activate)

    def stop_accepting(self) -> None:
        # A datagram server's socket is also what in-flight handlers reply through.
        if self._server.socket_type == socket.SOCK_STREAM:
            self._server.socket.close()

    def wait_accepted_taken(self, timeout: float) -> bool:
        # The connections waiting are in the kernel's backlog, which closing
        # the socket resets (as the stdlib's server_close does).
        return True

    def close(self) -> None:
        from txsocketserver._twisted import reactor as _reactor

        _reactor.release(self)
        server = self._server
        server.socket.close()
        if self._unix_bound:
            self._unix_bound = False
            remove_socket_file(server.server_address)
        if self._unix_lock is not None:
            self._unix_lock.unlock()
            self._unix_lock = None
