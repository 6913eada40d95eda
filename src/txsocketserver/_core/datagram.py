# -*- test-case-name: tests.test_datagram -*-
"""Datagram servers: one handler per datagram, on the same serving loop as streams.

How a datagram is served
========================

The serving thread waits on the bound socket exactly as on a listening socket
(see ``_twisted.readiness``) until a datagram is waiting, then runs the stdlib
hooks in the stdlib order: ``get_request()`` reads one datagram (at most
``max_packet_size`` bytes), ``verify_request()``, ``process_request()``.  The
handler gets ``request = (data, socket)`` with the server's real socket and
replies with ``socket.sendto`` (``DatagramRequestHandler.finish``).

Why not a Twisted ``DatagramProtocol`` that reads datagrams on the reactor
thread and queues them for the serving thread:

* an overridden ``get_request`` (reading with ``recvmsg`` for ancillary data,
  say) keeps working, because it is still what reads the datagram;
* no datagram is copied across threads, and no queue grows in our memory;
* a synchronous server reads a datagram only when it is ready to handle it, so
  the others wait in the kernel's socket buffer (``SO_RCVBUF``), where the
  kernel, not an unbounded queue of ours, decides what a flood costs.

Replies from several handler threads (``ThreadingUDPServer``) go through the
same socket while the serving thread reads from it: each ``sendto`` is one
system call that sends one whole datagram, so they need no lock.  The socket
stays blocking, so a full send buffer makes a reply wait instead of dropping it.

Truncation
==========

A datagram longer than ``max_packet_size`` is truncated, as in the stdlib: the
handler receives its first ``max_packet_size`` bytes and the rest is lost.
The stdlib says nothing about it; here ``get_request`` asks for one byte
more than ``max_packet_size``: if it gets it, the datagram was longer, so it
cuts the data to ``max_packet_size`` (what the stdlib's handler would have
received), counts the datagram in the server's ``truncated_datagrams`` and
logs one warning per server (logger ``"txsocketserver"``).  That costs one
length check per datagram; ``recvmsg`` and its ``MSG_TRUNC`` flag would tell
the same, but build an ancillary-data list and a 4-tuple for every datagram,
and do not exist on Windows.
"""

from __future__ import annotations

import socket

from txsocketserver._core import lifecycle
from txsocketserver._core.base import log_warning
from txsocketserver._core.stream import TCPServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class UDPServer(TCPServer):
    """UDP server class: one handler per datagram, ``request`` is ``(data, socket)``.

    Synchronous: one datagram is handled at a time, and the ones that arrive
    meanwhile wait in the kernel's socket buffer (those that do not fit in it
    are dropped by the kernel, as for the stdlib's server).  Mix in
    ``ThreadingMixIn`` (``ThreadingUDPServer``) to handle them on pool threads.

    Args:
        server_address: ``(host, port)`` (``(host, port, flowinfo, scope_id)``
            with ``address_family = AF_INET6``); port 0 picks a free port, read
            back from ``server_address`` after binding.
        RequestHandlerClass: called as ``RequestHandlerClass((data, socket),
            client_address, server)`` for each datagram.
        bind_and_activate: when false, the caller must call ``server_bind()``
            (and ``server_activate()``, which does nothing here) itself.

    Error handling:
        Binding errors propagate from the constructor after the socket is
        closed, as in the stdlib.  An ``OSError`` while reading a datagram is
        ignored (the loop waits for the next one); a handler's exception goes
        to ``handle_error()`` and the next datagram is served.
    """

    socket_type = socket.SOCK_DGRAM
    # Set SO_REUSEADDR before bind.
    allow_reuse_address = False
    # Set SO_REUSEPORT before bind (several processes sharing one port).
    allow_reuse_port = False
    # Longest datagram read; the rest of a longer one is lost, as in the stdlib
    # (counted in truncated_datagrams).
    max_packet_size = 8192
    # Ours: datagrams truncated to max_packet_size since the server was made.
    truncated_datagrams = 0

    def get_request(self) -> tuple[Any, Any]:
        """Read one datagram: return ``((data, socket), client_address)``.

        Called by the serving loop when a datagram is waiting.  May be
        overridden; an override takes over truncation detection too.
        """
        limit = self.max_packet_size
        data, client_addr = self.socket.recvfrom(limit + 1)
        if len(data) > limit:
            data = data[:limit]
            self._datagram_truncated(client_addr)
        return (data, self.socket), client_addr

    def _datagram_truncated(self, client_address: Any) -> None:
        self.truncated_datagrams += 1
        if self.truncated_datagrams == 1:
            log_warning(
                "%s at %r: a datagram from %r was longer than max_packet_size (%d bytes) "
                "and was truncated, as socketserver does; set max_packet_size higher to "
                "receive such datagrams whole. Further ones are only counted in "
                "truncated_datagrams.",
                type(self).__name__,
                self.server_address,
                client_address,
                self.max_packet_size,
            )

    def _accepted_record(self, request: Any, client_address: Any) -> Any:
        record = lifecycle.accepted(self, client_address, client_address)
        if record is not None and isinstance(request, tuple) and request:
            record.bytes_received = len(request[0])
        return record

    def server_activate(self) -> None:
        """No ``listen()`` for datagram sockets."""

    def shutdown_request(self, request: Any) -> None:
        """Nothing to shut down: calls ``close_request``."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Nothing to close: the socket in ``request`` is the server's own."""


if hasattr(socket, "AF_UNIX"):

    class UnixDatagramServer(UDPServer):
        """A datagram server on a Unix socket path (the path must not exist yet).

        ``client_address`` is the path the client bound its socket to.  A
        client that did not bind has no address: ``client_address`` is then
        ``None`` (``''`` on some systems), as in the stdlib, and no reply can
        reach it; ``DatagramRequestHandler`` then skips the reply instead of
        failing (see its docstring).
        """

        address_family = socket.AF_UNIX


__all__ = ["UDPServer"] + (["UnixDatagramServer"] if hasattr(socket, "AF_UNIX") else [])
