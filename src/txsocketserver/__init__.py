"""Python's ``socketserver`` API, complete and faithful, running on Twisted.

``import txsocketserver as socketserver`` and code written for the stdlib runs
unchanged; the same servers also run inside a Twisted application.  Import
everything from here: the underscored modules are private.
"""

from txsocketserver._base import BaseServer
from txsocketserver._datagram import UDPServer, UnixDatagramServer
from txsocketserver._endpoints import Endpoint
from txsocketserver._forking import ForkingMixIn
from txsocketserver._handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    StreamRequestHandler,
)
from txsocketserver._service import ServerService, start_server
from txsocketserver._stream import TCPServer, UnixStreamServer
from txsocketserver._threading import ThreadingMixIn


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
    # Beyond socketserver: the Twisted world.
    "Endpoint",
    "ServerService",
    "start_server",
]
