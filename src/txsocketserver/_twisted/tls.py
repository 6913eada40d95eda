# -*- test-case-name: tests.test_tls -*-
"""TLS for ``ssl:`` endpoint descriptions, done in the handler's own thread.

Theory of operation
===================

An ``ssl:`` description is a TCP port plus TLS options.  A stream server
serves it on the *socket* path (see ``_core.stream`` and
``endpoints.listening_socket``): it binds, listens and accepts a real TCP
socket exactly as for ``("host", port)``, and ``get_request()`` wraps each
accepted socket in an ``ssl.SSLSocket`` made from the :class:`ssl.SSLContext`
that :func:`server_context` builds from the description's options.  The
wrapping does no I/O (``do_handshake_on_connect=False``):
``TCPServer.finish_request`` completes the handshake (:func:`handshake`) in
the thread that runs the request, before the handler is made, bounded by the
handler class's ``timeout``.  So a threading or forking server's serving
thread never waits on a client's handshake (a synchronous server serves one
request at a time in that thread, handshake included), and the handler sees
a connection with TLS established (``version()``, ``getpeercert()``) as with
the stdlib idiom.

The handler therefore gets what the stdlib idiom (``get_request`` wrapping
the socket in TLS) gives it, without that idiom's stall: an
``ssl.SSLSocket``, with ``makefile``, timeouts, ``getpeercert``,
``version``..., and the kernel's flow control (a client that stops reading
blocks the handler's ``sendall``).  Twisted still parses and checks the
description when the server is created (so the errors are Twisted's), and
owns everything else about the endpoint syntax.

Why not Twisted's TLS transport, or pyOpenSSL in the handler's thread:
measured on the persistent echo, a blocking handler behind Twisted's TLS
transport crosses threads twice per request (0.28-0.54 of a native Twisted
TLS server); pyOpenSSL driven from handler threads releases and retakes the
GIL on every one of its many small C calls, which with 16 busy handler
threads made it 0.24.  The ``ssl`` module releases the GIL only around real
I/O, like a plain socket.

What the options mean is Twisted's (``twisted.internet.endpoints``'s ``ssl:``
parser): ``privateKey`` (default ``server.pem``), ``certKey`` (default: the
``privateKey`` file), ``extraCertChain`` (more PEM certificates to send),
``dhParameters`` (a PEM file of DH parameters), ``sslmethod`` (pin one TLS
version, e.g. ``TLSv1_2_METHOD``), ``interface``, ``backlog``.  The cipher
policy is the ``ssl`` module's default (TLS 1.2 or later, forward-secret
AEAD ciphers first), like Twisted's own.  An ``SSL4ServerEndpoint`` *object*
(any Twisted TLS configuration: client certificates, SNI...) goes through
Twisted's TLS instead.

How a connection ends: ``TCPServer.shutdown_request`` sends TLS's
``close_notify`` (if it can without waiting) before closing, as Twisted does,
so clients see a clean end rather than a truncated stream.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import tempfile
from typing import Any

from zope.interface import implementer

from txsocketserver._twisted import compat
from txsocketserver._twisted.interfaces import IConnectionSecurity

# sslmethod values (pyOpenSSL method names) that pin one TLS version.
_PINNED_VERSIONS = {
    "TLSv1_METHOD": ssl.TLSVersion.TLSv1,
    "TLSv1_1_METHOD": ssl.TLSVersion.TLSv1_1,
    "TLSv1_2_METHOD": ssl.TLSVersion.TLSv1_2,
}
# sslmethod values that let the two sides agree on any version.
_ANY_VERSION = {"SSLv23_METHOD", "TLS_METHOD", "TLS_SERVER_METHOD"}

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.DOTALL
)


def server_context(description: str) -> ssl.SSLContext | None:
    """The server ``SSLContext`` for an ``ssl:`` endpoint *description*, or
    ``None`` if it has options this module does not know (it is then served
    through Twisted's TLS, which does).

    Error handling:
        ``OSError``/``ssl.SSLError`` for unreadable or mismatched key and
        certificate files (Twisted has normally refused them first).
    """
    chosen = compat.ssl_description_options(description)
    if chosen is None:
        return None
    if chosen["certKey"] is None:
        chosen["certKey"] = chosen["privateKey"]
    method = chosen["sslmethod"]
    if method is not None and method not in _PINNED_VERSIONS and method not in _ANY_VERSION:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if method in _PINNED_VERSIONS:
        context.minimum_version = context.maximum_version = _PINNED_VERSIONS[method]
    if chosen["extraCertChain"] is None:
        context.load_cert_chain(chosen["certKey"], chosen["privateKey"])
    else:
        _load_with_chain(
            context, chosen["certKey"], chosen["extraCertChain"], chosen["privateKey"]
        )
    if chosen["dhParameters"] is not None:
        context.load_dh_params(chosen["dhParameters"])
    return context


def _load_with_chain(context: ssl.SSLContext, certificate: str, chain: str, key: str) -> None:
    """Load *certificate* followed by the certificates in *chain*.

    ``load_cert_chain`` takes the whole chain from one file, so the
    certificates (public, never the key) go through a temporary file.
    """
    certificates = []
    for path in (certificate, chain):
        with open(path, "rb") as pem:
            certificates += _PEM_CERTIFICATE.findall(pem.read())
    handle, path = tempfile.mkstemp(prefix="txsocketserver-chain-", suffix=".pem")
    try:
        with os.fdopen(handle, "wb") as combined:
            combined.write(b"".join(certificates))
        context.load_cert_chain(path, key)
    finally:
        os.unlink(path)


@implementer(IConnectionSecurity)
class TLSSecurity:
    """TLS around each connection of an ``ssl:`` description, with *context*."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def wrap(self, request: socket.socket) -> ssl.SSLSocket:
        """The accepted socket as the server side of TLS; no I/O happens here."""
        try:
            return self.context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except BaseException:
            request.close()
            raise

    def establish(self, request: Any, handler_class: Any) -> bool:
        # The handler class's timeout bounds the handshake, as it will its reads.
        return handshake(request, getattr(handler_class, "timeout", None))

    def end(self, request: Any) -> None:
        send_close_notify(request)


def handshake(request: Any, timeout: float | None = None) -> bool:
    """Complete the TLS handshake of *request*, in the calling thread.

    *timeout* (the handler class's ``timeout``) bounds the handshake when the
    socket has none of its own, as it will bound the handler's reads.

    Returns ``False`` if the client left or stalled during it (an EOF, a
    reset, the timeout: a TCP health check, a client that gave up), which is
    nobody's error: the request is then closed like one that never came, as
    the stdlib's ``get_request`` idiom and Twisted both do.

    Error handling:
        ``ssl.SSLError`` for a client that does not speak TLS or cannot agree
        on it.
    """
    if not isinstance(request, ssl.SSLSocket):
        return True
    previous = request.gettimeout()
    if previous is None and timeout is not None:
        request.settimeout(timeout)
    try:
        request.do_handshake()
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, TimeoutError):
        return False
    finally:
        if request.fileno() != -1:
            request.settimeout(previous)
    return True


def send_close_notify(request: Any) -> None:
    """Send TLS's ``close_notify`` on *request* if that needs no waiting.

    ``unwrap()`` sends it, then would wait for the peer's: without blocking,
    that wait fails at once, and the connection is being closed anyway.
    """
    if not isinstance(request, ssl.SSLSocket) or request.fileno() == -1:
        return
    try:
        request.setblocking(False)
        request.unwrap()
    except (OSError, ValueError):
        pass
