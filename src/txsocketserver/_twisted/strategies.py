# -*- test-case-name: tests.test_listeners,tests.test_layout -*-
"""What the Twisted-free core asks of the Twisted side, in one module.

The core (``txsocketserver._core``) imports this module, and nothing else of
the parts above it, when a server is made or first serves
(``_core.base.twisted_side``).  Here a stream server's three strategies are
chosen together, once, when it is made (:func:`strategies_for`): its serving
(the serving thread, or the reactor for an async handler class), its
listener and its connection security.  The rest are the pieces a serving loop
or a mixin needs when it starts: the readiness of a socket, a thread pool, the
reactor-thread guard.  ``docs/architecture.md`` tells the whole design.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, NamedTuple

from txsocketserver._twisted.interfaces import IListener, IRequestReadiness
from txsocketserver._twisted.listeners import SocketListener
from txsocketserver._twisted.reactor import refuse_reactor_thread

# The module that defines txsocketserver.Endpoint: an address can be an
# Endpoint only if that module was imported, and a plain server never imports it.
_ENDPOINTS_MODULE = "txsocketserver._twisted.endpoints"


class Strategies(NamedTuple):
    """A stream server's strategies, chosen together when it is made.

    ``settings``: the server attributes the choice decides (``socket``; for
    an endpoint description, ``server_address``, ``address_family``,
    ``request_queue_size``; ``_requests_finish_elsewhere`` for async
    handlers), which the server sets before it binds.
    """

    serving: Any  # IServing
    listener: IListener
    security: Any  # IConnectionSecurity
    settings: dict[str, Any]


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


def _forking_behind_proxy(server: Any, serving: Any, serving_thread: Any, endpoint: Any) -> bool:
    """Whether *server* forks each request behind ``haproxy:``: its children
    need real sockets, which ``proxied_sockets`` gives them."""
    from txsocketserver._core.forking_mixin import ForkingMixIn
    from txsocketserver._twisted.endpoints import proxy_protocol_endpoint

    return (
        serving is serving_thread
        and isinstance(server, ForkingMixIn)
        and proxy_protocol_endpoint(endpoint.resolve()) is not None
    )


def strategies_for(server: Any, serving_thread: Any, plain: Any) -> Strategies:
    """Choose how *server* (a ``TCPServer`` being constructed) serves, gets
    its connections, and secures them.

    The serving: the handler class's own, if it names one (an async handler
    class names ``AsyncServing``: the reactor takes the requests), else
    *serving_thread* (the core's ``ServingThread``, given by the core so that
    this side imports nothing of it).  *plain*: the core's connection
    security for plain connections.  The listener and security: a
    :class:`SocketListener` for a socket address or an endpoint that is just
    a listening socket (``tcp:``, ``tcp6:``, ``unix:``, and ``ssl:`` with TLS
    in the request's thread), else the serving's endpoint listener, where
    Twisted accepts.

    Error handling:
        ``ValueError`` for an endpoint description Twisted cannot parse;
        ``TypeError`` for a stream endpoint given to a datagram server.
    """
    make_serving = getattr(server.RequestHandlerClass, "_serving_strategy", None)
    serving = serving_thread if make_serving is None else make_serving(server)
    settings: dict[str, Any] = dict(serving.server_settings)
    endpoint = _endpoint_named(server)
    if endpoint is None:
        settings["socket"] = socket.socket(server.address_family, server.socket_type)
        return Strategies(serving, SocketListener(server), plain, settings)
    from txsocketserver._twisted import endpoints

    if server.socket_type != socket.SOCK_STREAM:
        raise TypeError(f"{type(server).__name__} cannot serve a stream endpoint ({endpoint!r})")
    listening = endpoints.listening_socket(endpoint)
    if listening is not None and listening.tls is not None and not serving.tls_in_request:
        # Async handlers run on the reactor: Twisted does their TLS there.
        listening = None
    if listening is None and _forking_behind_proxy(server, serving, serving_thread, endpoint):
        from txsocketserver._twisted import proxied_sockets

        return proxied_sockets.strategies(server, serving, plain, settings, endpoint)  # type: ignore[no-any-return]
    if listening is None:
        # A PROXY-protocol endpoint's connections wait in our queue, not the
        # kernel's: its backlog sizes that queue, as for tcp:.
        backlog = endpoints.endpoint_backlog(endpoint) or server.request_queue_size
        settings.update(socket=None, request_queue_size=backlog)
        listener = serving.endpoint_listener(endpoint, backlog=backlog, server=server)
        return Strategies(serving, listener, plain, settings)
    # An endpoint that is just a listening socket is served as one: the
    # stdlib's hooks bind and accept it, handlers get real sockets.
    security: Any = plain
    if listening.tls is not None:
        from txsocketserver._twisted.tls import TLSSecurity

        security = TLSSecurity(listening.tls)
    settings.update(
        server_address=listening.address,
        address_family=listening.family,
        request_queue_size=listening.backlog,
        socket=socket.socket(listening.family, server.socket_type),
    )
    listener = SocketListener(
        server,
        # Twisted's TCP ports always reuse the address, so their endpoints do too.
        reuse_address=listening.family != getattr(socket, "AF_UNIX", None),
        unix_mode=listening.unix_mode,
        unix_lock=listening.unix_lock,
        from_endpoint=True,
        options=listening.options,
    )
    return Strategies(serving, listener, security, settings)


def endpoint_listener(endpoint: Any, *, backlog: int, server: Any) -> IListener:
    """The listener of a server whose serving thread takes the requests from
    an endpoint (``ServingThread.endpoint_listener``)."""
    from txsocketserver._twisted.endpoints import EndpointListener

    return EndpointListener(endpoint, backlog=backlog, server=server)


def socket_readiness(fd: int) -> IRequestReadiness:
    """The readiness of a socket of the server's own (``BaseServer``)."""
    from txsocketserver._twisted.readiness import SocketReadiness

    return SocketReadiness(fd)


def thread_dispatcher(**options: Any) -> Any:
    """A ``ThreadDispatcher`` (``ThreadingMixIn``): see its arguments."""
    from txsocketserver._twisted.thread_dispatcher import ThreadDispatcher

    return ThreadDispatcher(**options)


def request_threads() -> Any:
    """A ``RequestThreads`` list (``ThreadingMixIn``'s ``_threads``)."""
    from txsocketserver._twisted.thread_dispatcher import RequestThreads

    return RequestThreads()


__all__ = [
    "Strategies",
    "endpoint_listener",
    "refuse_reactor_thread",
    "request_threads",
    "socket_readiness",
    "strategies_for",
    "thread_dispatcher",
]
