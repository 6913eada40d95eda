# -*- test-case-name: tests.test_forking_tls,tests.test_layout -*-
"""TLS for a forking server's children: the handshake runs in the child.

A TLS connection cannot cross processes once its handshake has begun (its
state lives in one process's memory), but an accepted TCP socket on which
no TLS byte has been read can.  So an ``ssl:`` server's ``get_request``
wraps the connection without I/O, as on every path
(``_twisted.tls.TLSSecurity``, which gives the ``ssl.SSLSocket`` a
``for_child``); when the request is handed to a child, that socket is
pickled as its plain fd plus the :class:`ChildTLS` of the listener
(:func:`reduce_for_child`, called by ``_forking.template.reduce_socket``),
and the child wraps the fd
again with the ``ssl.SSLContext`` the ChildTLS makes.  The child's server
object holds the same ChildTLS as its connection security (the carrier
puts it in place of the serving process's, ``ChildTLS.for_child``), which
runs the handshake within ``handshakeTimeout`` before the handler is made.

A :class:`ChildTLS` is one *generation* of a listener's TLS: the policy
and the PEM bytes of the key, the certificates and the client CAs, read when
the serving process loaded (or reloaded) them.  A certificate reload makes a
new one; a reload that fails keeps the old one, so a child never reads the
files itself and never sees a bad new file.  It pickles as its token and
material: the process that unpickles it (the template, when the server's
state is installed there) makes its context once per token, and the
children forked from there inherit it.

A handshake that fails in a child is logged on the child's stderr (the
template's children have no Twisted logger; a forked request's tracebacks go
there too) and the child exits with :data:`EXIT_TLS_HANDSHAKE`, which the
serving process's ``ForkingMixIn`` turns into the lifecycle's
``refused:tls_handshake``.

This module imports no Twisted: a template imports it to unpickle a
request (``tests/test_layout.py``).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import tempfile

from txsocketserver._forking.template import reduce_fd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: A child's exit status when its client's TLS handshake failed: the request
#: was refused, which is no handler error (1 is the stdlib's status for one).
EXIT_TLS_HANDSHAKE = 3


# -- the handshake, on every blocking path ---------------------------------------------


def _peer_of(request: Any) -> Any:
    try:
        return request.getpeername()
    except OSError:
        return "a client that left"


def handshake(request: Any, timeout: float | None, warn: Callable[..., None]) -> bool:
    """Complete the TLS handshake of *request*, in the calling thread.

    *timeout* bounds the whole handshake when the socket has no timeout of
    its own; *warn* is called as Twisted's ``Logger.warn`` (a format and
    its fields: ``peer``, and ``reason`` or ``timeout``) when it fails for a
    reason other than the client leaving.

    Returns ``False`` if it did not complete: the client left or stalled
    (an EOF, a reset, the deadline: a TCP health check, a client that gave
    up), or could not agree on TLS (no certificate, one from another CA, a
    protocol version or cipher refused, not TLS at all).  The request is
    then closed like one that never came, as Twisted does.
    """
    if not isinstance(request, ssl.SSLSocket):
        return True
    previous = request.gettimeout()
    if previous is None and timeout is not None:
        request.settimeout(timeout)
    try:
        request.do_handshake()
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError):
        return False
    except TimeoutError:
        warn(
            "TLS handshake with {peer} timed out after {timeout}s",
            peer=_peer_of(request),
            timeout=timeout,
        )
        return False
    except ssl.SSLError as error:
        warn(
            "TLS handshake with {peer} failed: {reason}",
            peer=_peer_of(request),
            reason=error.reason or str(error),
        )
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


def handshake_limit(handshake_timeout: float, handler_class: Any) -> float:
    """``handshakeTimeout``, or the handler class's ``timeout`` if shorter
    (it will bound the handler's reads)."""
    timeout = getattr(handler_class, "timeout", None)
    return handshake_timeout if timeout is None else min(handshake_timeout, timeout)


# -- one generation of a listener's TLS, for children ---------------------------------------


class Material:
    """What a child's ``ssl.SSLContext`` is made of: the policy's settings
    and the PEM bytes of its files, read in the serving process."""

    __slots__ = (
        "description",
        "chain",
        "key",
        "client_ca",
        "dh_parameters",
        "min_version",
        "max_version",
        "ciphers",
        "alpn",
        "verify_client",
        "handshake_timeout",
    )
    description: str
    chain: bytes
    key: bytes
    client_ca: bytes | None
    dh_parameters: bytes | None
    min_version: int
    max_version: int | None
    ciphers: str | None
    alpn: tuple[str, ...]
    verify_client: str | None
    handshake_timeout: float

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields[name])

    def __reduce__(self) -> Any:
        return _material, tuple(getattr(self, name) for name in self.__slots__)


def _material(*values: Any) -> Material:
    return Material(**dict(zip(Material.__slots__, values, strict=True)))


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def pem_certificates(pem: bytes) -> bytes:
    """The certificates of a PEM file (anything else, a key say, left out)."""
    found = []
    start = pem.find(_PEM_CERTIFICATE)
    while start != -1:
        end = pem.find(_PEM_END, start)
        if end == -1:
            break
        end += len(_PEM_END)
        found.append(pem[start:end] + b"\n")
        start = pem.find(_PEM_CERTIFICATE, end)
    return b"".join(found)


def read_material(description: str, policy: Any) -> Material:
    """The :class:`Material` of *policy* (a ``_twisted.tls.TLSPolicy``), its
    files read now.

    Error handling:
        ``OSError`` for a file that cannot be read.
    """

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as file:
            return file.read()

    chain = pem_certificates(read(policy.certificate) or b"")
    if policy.extra_chain is not None:
        chain += pem_certificates(read(policy.extra_chain) or b"")
    return Material(
        description=description,
        chain=chain,
        key=read(policy.private_key) or b"",
        client_ca=read(policy.client_ca),
        dh_parameters=read(policy.dh_parameters),
        min_version=int(policy.min_version),
        max_version=None if policy.max_version is None else int(policy.max_version),
        ciphers=policy.ciphers,
        alpn=tuple(policy.alpn),
        verify_client=policy.verify_client,
        handshake_timeout=policy.handshake_timeout,
    )


class _PemFile:
    """A path to *data* for OpenSSL, which loads keys and certificates by
    name: an anonymous memory file where there are those (the key never
    touches a disk), else a private temporary file, removed on exit."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._fd = -1
        self._path: str | None = None

    def __enter__(self) -> str:
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self._fd = os.memfd_create("txsocketserver-pem", os.MFD_CLOEXEC)
            os.write(self._fd, self._data)
            return f"/proc/self/fd/{self._fd}"
        self._fd, self._path = tempfile.mkstemp(prefix="txsocketserver-", suffix=".pem")
        os.write(self._fd, self._data)
        return self._path

    def __exit__(self, *exc_info: Any) -> None:
        os.close(self._fd)
        if self._path is not None:
            os.unlink(self._path)


def context_from(material: Material) -> ssl.SSLContext:
    """The server-side ``ssl.SSLContext`` of *material*: the same settings
    as the serving process's (``_twisted.tls.ssl_context``).

    Error handling:
        ``ssl.SSLError``/``OSError`` for material that does not load.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.minimum_version = ssl.TLSVersion(material.min_version)
    if material.max_version is not None:
        context.maximum_version = ssl.TLSVersion(material.max_version)
    if material.ciphers is not None:
        context.set_ciphers(material.ciphers)
    if material.alpn:
        context.set_alpn_protocols(list(material.alpn))
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii", "replace"))
        context.verify_mode = (
            ssl.CERT_REQUIRED if material.verify_client == "required" else ssl.CERT_OPTIONAL
        )
    with _PemFile(material.chain) as chain, _PemFile(material.key) as key:
        context.load_cert_chain(chain, key)
    if material.dh_parameters is not None:
        with _PemFile(material.dh_parameters) as dh_parameters:
            context.load_dh_params(dh_parameters)
    return context


def _warn_on_stderr(format: str, **fields: Any) -> None:
    try:
        sys.stderr.write(f"txsocketserver: {format.format(**fields)}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


class ChildTLS:
    """One generation of a listener's TLS, as a forked request uses it: the
    connection security of the child's server object (``wrap``,
    ``establish``, ``end``, as ``_twisted.tls.TLSSecurity``), and the
    context that its connection is wrapped with there.

    ``handshake_refused`` is set in the child whose handshake failed: its
    exit status is then :data:`EXIT_TLS_HANDSHAKE`.
    """

    def __init__(self, token: bytes, material: Material) -> None:
        self.token = token
        self.material = material
        self.handshake_refused = False
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"<ChildTLS {self.material.description!r}>"

    def __reduce__(self) -> Any:
        return child_tls, (self.token, self.material)

    @property
    def context(self) -> ssl.SSLContext:
        """The context of this generation, made on first use in each process
        (the template's is inherited by the children it forks)."""
        if self._context is None:
            self._context = context_from(self.material)
        return self._context

    def wrap(self, request: Any) -> Any:
        return request

    def establish(self, request: Any, handler_class: Any) -> bool:
        limit = handshake_limit(self.material.handshake_timeout, handler_class)
        if handshake(request, limit, _warn_on_stderr):
            return True
        self.handshake_refused = True
        return False

    def end(self, request: Any) -> None:
        send_close_notify(request)

    def exit_status(self, succeeded: bool) -> int:
        """The child's exit status: :data:`EXIT_TLS_HANDSHAKE` if the
        handshake failed, else the stdlib's (0, or 1 after a handler error)."""
        if self.handshake_refused:
            return EXIT_TLS_HANDSHAKE
        return 0 if succeeded else 1


# The generations this process has unpickled, by token: one context each.
_generations: dict[bytes, ChildTLS] = {}


def child_tls(token: bytes, material: Material) -> ChildTLS:
    """The :class:`ChildTLS` named *token* in this process (what a pickled one
    rebuilds): made once, so that its context is made once."""
    found = _generations.get(token)
    if found is None:
        # Only the newest generations are worth keeping.
        if len(_generations) >= 4:
            _generations.pop(next(iter(_generations)))
        found = _generations[token] = ChildTLS(token, material)
        # Made here, where it is unpickled first: in the template, when the
        # server's state is installed, so that every child forked from it
        # inherits the context instead of making its own.
        try:
            found.context  # noqa: B018
        except (OSError, ssl.SSLError):
            pass  # each request's child fails on it, with its traceback
    return found


# -- the connection, on its way to a child ----------------------------------------------


def reduce_for_child(fds: list[int], sock: Any) -> Any:
    """The reduction ``_forking.template.reduce_socket`` pickles for a TLS
    connection that ``_twisted.tls.TLSSecurity`` wrapped (its ``for_child``
    gives the :class:`ChildTLS` of its listener): the plain socket's fd, and
    the TLS the child wraps it in again.

    Error handling:
        ``TypeError`` once the handshake has been done in this process.
    """
    if sock.version() is not None:
        raise TypeError(
            "a TLS connection whose handshake was done in the serving process "
            "cannot be handed to another process"
        )
    return _wrap_in_child, (_FdSocket(reduce_fd(fds, sock)), sock.for_child())


class _FdSocket:
    """Pickles as the plain socket on a request's fd (``reduce_fd``'s reduction)."""

    __slots__ = ("reduction",)

    def __init__(self, reduction: Any) -> None:
        self.reduction = reduction

    def __reduce__(self) -> Any:
        return self.reduction


def _wrap_in_child(sock: socket.socket, generation: ChildTLS) -> ssl.SSLSocket:
    """The connection in the child: TLS of *generation*, no handshake yet."""
    return generation.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
