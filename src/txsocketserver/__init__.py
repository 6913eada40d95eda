# -*- test-case-name: tests.test_stream_api,tests.test_packaging,tests.test_layout -*-
"""Python's ``socketserver`` API, complete and faithful, running on Twisted.

``import txsocketserver as socketserver`` and code written for the stdlib runs
unchanged; the same servers also run inside a Twisted application.  Import
everything from here: the underscored modules are private.

Importing the package imports neither Twisted nor ``zope.interface``: the
socketserver names are defined without them, and Twisted is loaded when a
server is created.  A forking server's children, which import the
server and handler classes but never serve, stay small and cheap to fork
(see ``docs/architecture.md``).  The Twisted world's names (``Endpoint``,
``ServerService``, ``start_server``, ``Workers``...) are imported on first use.
"""

from __future__ import annotations

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

from txsocketserver._async import (
    AsyncBaseRequestHandler,
    AsyncDatagramRequestHandler,
    AsyncStreamRequestHandler,
)
from txsocketserver._core.base import BaseServer
from txsocketserver._core.datagram import UDPServer, UnixDatagramServer
from txsocketserver._core.forking_mixin import ForkingMixIn
from txsocketserver._core.handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    StreamRequestHandler,
)
from txsocketserver._core.lifecycle import ConnectionRecord, LifecycleObserver
from txsocketserver._core.stream import TCPServer, UnixStreamServer
from txsocketserver._core.threading_mixin import ThreadingMixIn

TYPE_CHECKING = False  # not typing's: see txsocketserver._core
if TYPE_CHECKING:
    from typing import Any

    from txsocketserver._observability.health import Health
    from txsocketserver._observability.metrics import Metrics
    from txsocketserver._twisted.endpoints import Endpoint
    from txsocketserver._twisted.service import ServerService, start_server
    from txsocketserver._workers.supervisor import Workers, run_workers, start_workers

# The Twisted world's names, and the module that defines each.
_TWISTED_WORLD = {
    "Endpoint": "txsocketserver._twisted.endpoints",
    "ServerService": "txsocketserver._twisted.service",
    "start_server": "txsocketserver._twisted.service",
    "Workers": "txsocketserver._workers.supervisor",
    "run_workers": "txsocketserver._workers.supervisor",
    "start_workers": "txsocketserver._workers.supervisor",
    "Metrics": "txsocketserver._observability.metrics",
    "Health": "txsocketserver._observability.health",
}


def __getattr__(name: str) -> Any:
    module_name = _TWISTED_WORLD.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TWISTED_WORLD))


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    """A TCP server running each request on a pool thread."""


class ThreadingUnixStreamServer(ThreadingMixIn, UnixStreamServer):
    """A Unix stream server running each request on a pool thread."""


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    """A UDP server running each datagram's handler on a pool thread."""


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    """A Unix datagram server running each datagram's handler on a pool thread."""


class ForkingTCPServer(ForkingMixIn, TCPServer):
    """A TCP server running each request in a process of its own."""


class ForkingUDPServer(ForkingMixIn, UDPServer):
    """A UDP server running each datagram's handler in a process of its own."""


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    """A Unix stream server running each request in a process of its own."""


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    """A Unix datagram server running each datagram's handler in a process of its own."""


__all__ = [
    "BaseServer",
    "TCPServer",
    "UDPServer",
    "ThreadingTCPServer",
    "ThreadingUDPServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "ThreadingMixIn",
    "UnixStreamServer",
    "ThreadingUnixStreamServer",
    "UnixDatagramServer",
    "ThreadingUnixDatagramServer",
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixStreamServer",
    "ForkingUnixDatagramServer",
    # Beyond socketserver: async handlers, on the reactor.
    "AsyncBaseRequestHandler",
    "AsyncStreamRequestHandler",
    "AsyncDatagramRequestHandler",
    # Beyond socketserver: observing every request's lifecycle.
    "ConnectionRecord",
    "LifecycleObserver",
    # Beyond socketserver: the Twisted world.
    "Endpoint",
    "ServerService",
    "start_server",
    # Beyond socketserver: worker processes sharing the listening sockets.
    "Workers",
    "run_workers",
    "start_workers",
    # Beyond socketserver: metrics, liveness and readiness.
    "Metrics",
    "Health",
]
