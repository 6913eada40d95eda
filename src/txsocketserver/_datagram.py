"""Datagram servers: one handler per datagram, on the same serving loop.

The bound socket is watched by the reactor exactly like a listening socket;
``get_request`` reads one datagram.  A synchronous server therefore leaves the
datagrams that arrive while a handler runs in the kernel's socket buffer.
"""

from __future__ import annotations

import socket
from typing import Any

from txsocketserver._stream import TCPServer


class UDPServer(TCPServer):
    """UDP server class: ``request`` is ``(data, socket)``."""

    socket_type = socket.SOCK_DGRAM
    allow_reuse_address = False
    allow_reuse_port = False
    # Longest datagram read; a longer one is truncated, as in the stdlib.
    max_packet_size = 8192

    def get_request(self) -> tuple[Any, Any]:
        data, client_addr = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), client_addr

    def server_activate(self) -> None:
        """No listen() for datagram sockets."""

    def shutdown_request(self, request: Any) -> None:
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Nothing to close: the socket is the server's."""


if hasattr(socket, "AF_UNIX"):

    class UnixDatagramServer(UDPServer):
        """A datagram server on a Unix socket path."""

        address_family = socket.AF_UNIX
