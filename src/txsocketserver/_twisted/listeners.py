# -*- test-case-name: tests.test_listeners,tests.test_endpoints -*-
"""How a server gets its requests: the :class:`IListener` a server picks once, when it is made.

A socket address, or an endpoint that is nothing but a listening socket
(``tcp:``, ``tcp6:``, ``unix:``, ``ssl:``), gets a :class:`SocketListener`: the
server's own socket, bound and listened to in the stdlib's order, accepted in
the serving thread.  Any other endpoint gets an ``EndpointListener``
(``_twisted.endpoints``), where Twisted accepts and the handler gets a socket
facade.  An ``ssl:`` description also picks the server's connection security
(``_twisted.tls``).  The whole story is in ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import sys
from typing import Any

from zope.interface import implementer

from txsocketserver._twisted.interfaces import IListener, IRequestReadiness

# The module that defines txsocketserver.Endpoint: an address can be an
# Endpoint only if that module was imported, and a plain server never imports it.
_ENDPOINTS_MODULE = "txsocketserver._twisted.endpoints"


def remove_socket_file(path: str) -> None:
    """Remove *path* if it is a socket file (never any other kind of file)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)


def _endpoint_named(server: Any) -> Any:
    """The ``Endpoint`` the server's address names, or ``None`` for a socket
    address (``endpoints.as_endpoint`` decides; its module is loaded only for
    an address that could be one)."""
    address = server.server_address
    could_be = isinstance(address, str) and ":" in address
    if not could_be and _ENDPOINTS_MODULE not in sys.modules:
        return None
    from txsocketserver._twisted import endpoints

    return endpoints.as_endpoint(address, server.address_family)


def listener_for(server: Any) -> IListener:
    """Pick how *server* (a ``TCPServer`` being constructed) gets its requests.

    Sets what the choice decides on the server: ``socket``, and for an
    endpoint served on a socket of its own ``server_address``,
    ``address_family``, ``request_queue_size`` and the TLS security.

    Error handling:
        ``ValueError`` for an endpoint description Twisted cannot parse;
        ``TypeError`` for a stream endpoint given to a datagram server.
    """
    endpoint = _endpoint_named(server)
    if endpoint is None:
        server.socket = socket.socket(server.address_family, server.socket_type)
        return SocketListener(server)
    from txsocketserver._twisted import endpoints

    if server.socket_type != socket.SOCK_STREAM:
        raise TypeError(f"{type(server).__name__} cannot serve a stream endpoint ({endpoint!r})")
    listening = endpoints.listening_socket(endpoint)
    if listening is not None and server._async is not None and listening.tls is not None:
        # Async handlers run on the reactor: Twisted does their TLS there.
        listening = None
    if listening is None:
        server.socket = None
        # A PROXY-protocol endpoint's connections wait in our queue, not the
        # kernel's: its backlog sizes that queue, as for tcp:.
        server.request_queue_size = (
            endpoints.endpoint_backlog(endpoint) or server.request_queue_size
        )
        if server._async is not None:
            from txsocketserver._async.serving import AsyncEndpointListener

            return AsyncEndpointListener(
                endpoint, backlog=server.request_queue_size, server=server, serving=server._async
            )
        return endpoints.EndpointListener(
            endpoint, backlog=server.request_queue_size, server=server
        )
    # An endpoint that is just a listening socket is served as one: the
    # stdlib's hooks bind and accept it, handlers get real sockets.
    server.server_address = listening.address
    server.address_family = listening.family
    server.request_queue_size = listening.backlog
    if listening.tls is not None:
        from txsocketserver._twisted.tls import TLSSecurity

        server._security = TLSSecurity(listening.tls)
    server.socket = socket.socket(server.address_family, server.socket_type)
    return SocketListener(
        server,
        # Twisted's TCP ports always reuse the address, so their endpoints do too.
        reuse_address=listening.family != getattr(socket, "AF_UNIX", None),
        unix_mode=listening.unix_mode,
        unix_lock=listening.unix_lock,
        from_endpoint=True,
    )


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

    def __init__(
        self,
        server: Any,
        *,
        reuse_address: bool = False,
        unix_mode: int | None = None,
        unix_lock: bool = False,
        from_endpoint: bool = False,
    ) -> None:
        self._server = server
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

    def bind(self) -> None:
        server = self._server
        sock = server.socket
        reuse_address = server.allow_reuse_address or self._reuse_address
        if reuse_address and hasattr(socket, "SO_REUSEADDR"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if server.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self._unix_lock_wanted:
            self._lock_unix_path(server.server_address)
        sock.bind(server.server_address)
        if self._unix_mode is not None and not server.server_address.startswith("\0"):
            self._unix_bound = True
            os.chmod(server.server_address, self._unix_mode)
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
        self._server.socket.listen(self._server.request_queue_size)

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

        # fileno() through the server: a subclass may override it.
        return SocketReadiness(self._server.fileno())

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

    def close(self) -> None:
        server = self._server
        server.socket.close()
        if self._unix_bound:
            self._unix_bound = False
            remove_socket_file(server.server_address)
        if self._unix_lock is not None:
            self._unix_lock.unlock()
            self._unix_lock = None
