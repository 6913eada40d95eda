"""Twisted's private API, read in this one place.

Serving ``tcp:``, ``tcp6:``, ``unix:`` and ``ssl:`` descriptions on a socket
of the server's own (``docs/architecture.md``) needs what Twisted parsed out
of a description, and Twisted has no public API for that.  Each assumption is
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


__all__ = [
    "TCPParameters",
    "UNIXParameters",
    "ssl_description_options",
    "tcp_parameters",
    "unix_parameters",
]
