"""Twisted's private API, read in this one place.

Serving ``tcp:``, ``tcp6:``, ``unix:`` and ``ssl:`` descriptions on a socket
of the server's own (``docs/architecture.md``) needs what Twisted parsed out
of a description, reading the PROXY header ourselves needs the endpoint that
``haproxy:`` wraps, bounding what silent clients can hold needs the size of
a port's accept batch, and half-closing through a wrapper needs to know what
the wrapper does to the bytes, and sending an async connection's bytes at
once (not on the reactor's next turn) needs Twisted's transport buffers.
Twisted has no public API for these.  Each
assumption is
written once here, and ``tests/test_twisted_compat.py`` checks each against
the installed Twisted, so a release that breaks one fails the suite rather
than quietly moving an endpoint to the slower path (where, among other
things, forking cannot serve it).  ``.ci/run`` runs the suite on the oldest
Twisted that ``pyproject.toml`` admits and on the newest.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple


class TCPParameters(NamedTuple):
    port: int
    interface: str
    backlog: int


class UNIXParameters(NamedTuple):
    address: str
    backlog: int
    mode: int
    # Twisted's lockfile=1 (its default): hold PATH.lock, clean a stale socket.
    lockfile: bool


def tcp_parameters(endpoint: Any) -> TCPParameters | None:
    """What a ``TCP4ServerEndpoint``/``TCP6ServerEndpoint`` (or the TCP part of an
    ``SSL4ServerEndpoint``) listens on; ``None`` for any other type, subclasses
    included (they may listen differently)."""
    from twisted.internet import endpoints

    kinds = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)
    if type(endpoint) not in (*kinds, endpoints.SSL4ServerEndpoint):
        return None
    return TCPParameters(endpoint._port, endpoint._interface, endpoint._backlog)


def unix_parameters(endpoint: Any) -> UNIXParameters | None:
    """What a ``UNIXServerEndpoint`` listens on; ``None`` for any other type."""
    from twisted.internet import endpoints

    if type(endpoint) is not endpoints.UNIXServerEndpoint:
        return None
    return UNIXParameters(
        endpoint._address, endpoint._backlog, endpoint._mode, bool(endpoint._wantPID)
    )


def ssl_description_options(description: str) -> dict[str, Any] | None:
    """The options of an ``ssl:`` description, by the names and defaults of
    Twisted's own ``ssl:`` parser (``privateKey``, ``certKey``,
    ``extraCertChain``, ``dhParameters``, ``sslmethod``, ``interface``,
    ``backlog``, ``port``), or ``None`` if it is not one this parser takes."""
    from twisted.internet import endpoints

    arguments, options = endpoints._parse(description)
    if not arguments or arguments[0] != "ssl":
        return None
    try:
        bound = inspect.signature(endpoints._parseSSL).bind(None, *arguments[1:], **options)
    except TypeError:
        return None
    bound.apply_defaults()
    chosen = dict(bound.arguments)
    chosen.pop("factory")
    return chosen


def proxied_endpoint(endpoint: Any) -> Any:
    """The endpoint a PROXY-protocol endpoint (``haproxy:...``,
    ``proxyEndpoint(...)``) wraps, or ``None`` for any other endpoint.

    Reads the private ``_WrapperServerEndpoint``'s ``_wrapperFactory`` and
    ``_wrappedEndpoint``, which ``proxyEndpoint`` has returned since Twisted 16.
    """
    from twisted.internet.endpoints import _WrapperServerEndpoint
    from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory

    if (
        isinstance(endpoint, _WrapperServerEndpoint)
        and getattr(endpoint, "_wrapperFactory", None) is HAProxyWrappingFactory
    ):
        return endpoint._wrappedEndpoint
    return None


def cap_accept_batch(port: Any, free: int) -> None:
    """Make *port*'s next accept batch no larger than *free* (at least 1).

    A POSIX port accepts ``numberAccepts`` connections per readable event
    (growing it after each full batch), ``stopReading()`` or not; a port
    without it (another reactor's) is left alone.
    """
    number = getattr(port, "numberAccepts", None)
    if isinstance(number, int):
        port.numberAccepts = max(1, min(number, free))


def half_close(transport: Any) -> Any:
    """The ``loseWriteConnection`` that half-closes the bytes a protocol writes
    to *transport*, or ``None`` if it cannot.

    A ``ProtocolWrapper`` that does not override ``write`` passes the bytes
    through unchanged, so half-closing the transport below it is right; one
    that transforms them (TLS) forwards unknown attributes to the TCP
    transport too, whose ``loseWriteConnection`` would cut the TLS stream
    mid-record: refused, unless the wrapper defines its own.
    """
    from twisted.protocols.policies import ProtocolWrapper

    for _ in range(16):
        if isinstance(transport, ProtocolWrapper):
            if "loseWriteConnection" in vars(type(transport)):
                return transport.loseWriteConnection
            if type(transport).write is not ProtocolWrapper.write:
                return None
            transport = transport.transport
            continue
        method = getattr(transport, "loseWriteConnection", None)
        return method if callable(method) else None
    return None


def _direct_writes(transport_class: Any) -> Any:
    """*transport_class* (``tcp.Server`` or ``unix.Server``), sending at once
    when nothing is queued, as asyncio's transports do.

    Twisted's ``write()`` always queues and sends on the reactor's next turn:
    for a request-reply protocol that is an ``epoll_ctl`` to watch for
    writability, a whole reactor turn to learn it, and another ``epoll_ctl``
    to stop, for every reply.  Here ``write()`` tries ``send()`` first when
    Twisted holds no bytes (nor, on Unix, descriptors to pass with them) and
    queues only what the kernel did not take; any error other than "would
    block" is left to Twisted's own write path, which meets it again and
    closes the connection as it always does.  The async writer calls
    ``write()`` once per handler step with what the step wrote, so the bytes
    of one reply still leave together (no Nagle stall between them).
    """

    class DirectWrites(transport_class):  # type: ignore[misc, valid-type]
        def write(self, data: bytes) -> None:
            if (
                self.dataBuffer
                or self._tempDataBuffer
                or not self.connected
                or self._writeDisconnected
                or getattr(self, "_sendmsgQueue", None)
            ):
                super().write(data)
                return
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0
            if sent < len(data):
                super().write(data[sent:])

    DirectWrites.__name__ = DirectWrites.__qualname__ = f"DirectWrites{transport_class.__name__}"
    return DirectWrites


_ADOPTED: dict[bool, Any] = {}


def adopted_transport(
    sock: Any, protocol: Any, client_address: Any, session: int, reactor: Any, *, unix: bool
) -> Any:
    """A transport for *sock*, a connection the server accepted itself, to
    give *protocol* (``makeConnection``).

    What ``IReactorSocket.adoptStreamConnection`` does, minus its ``dup()``
    and ``getpeername()`` (the address is known already, and a client that
    reset before this point would make its ``getpeername`` fail and leak the
    dup), with writes sent at once (``_direct_writes``).  ``tcp.Server`` and
    ``unix.Server`` take exactly these arguments since Twisted 8; a port of
    ``None`` is what ``adoptStreamConnection`` passes too.
    """
    kind = _ADOPTED.get(unix)
    if kind is None:
        from twisted.internet import tcp
        from twisted.internet import unix as unix_module

        kind = _ADOPTED[unix] = _direct_writes(unix_module.Server if unix else tcp.Server)
    return kind(sock, protocol, client_address, None, session, reactor)


__all__ = [
    "TCPParameters",
    "adopted_transport",
    "cap_accept_batch",
    "half_close",
    "proxied_endpoint",
    "UNIXParameters",
    "ssl_description_options",
    "tcp_parameters",
    "unix_parameters",
]
