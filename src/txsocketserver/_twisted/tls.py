# -*- test-case-name: tests.test_tls -*-
"""TLS for ``ssl:`` endpoint descriptions: the policy, the contexts, and their reload.

Theory of operation
===================

An ``ssl:`` description is a TCP port plus TLS options.  Twisted's own
``ssl:`` parser knows ``privateKey``, ``certKey``, ``extraCertChain``,
``dhParameters``, ``sslmethod``, ``interface`` and ``backlog``; the options
this module adds (:data:`TLS_OPTIONS`: client certificates, the version
range, ciphers, ALPN, the handshake deadline) are taken out of the
description (:func:`split_description`) before Twisted parses the rest, and
every value is checked when the server is made (``ValueError`` naming the
option).  :class:`TLSPolicy` is the whole of it, checked.

A :class:`TLSConfig` holds one listener's policy and the contexts made from
it: an :class:`ssl.SSLContext` for connections the server accepts itself,
and, made on first use, a pyOpenSSL context for connections Twisted's TLS
carries (async handlers, ``haproxy:ssl:``), both with the same settings.
:meth:`TLSConfig.reload` reads the files again and swaps in new contexts
only if every file is good; a connection holds the context it began with,
so established connections never notice.  :func:`reload_certificates` (what
SIGHUP does) reloads every live ``TLSConfig`` of the process, or a server's.

**Blocking handlers on the server's own socket** (the ``ssl:`` path of
``_core.stream`` and ``endpoints.listening_socket``): the server binds,
listens and accepts a real TCP socket exactly as for ``("host", port)``, and
``get_request()`` wraps each accepted socket in an ``ssl.SSLSocket``
(:class:`TLSSecurity`).  The wrapping does no I/O
(``do_handshake_on_connect=False``): ``TCPServer.finish_request`` completes
the handshake (:func:`handshake`) in the thread that runs the request,
before the handler is made, within ``handshakeTimeout`` seconds in all
(CPython's ``do_handshake`` counts its timeout as one deadline, so a client
trickling its ClientHello is cut off too).  So a threading server's serving
thread never waits on a client's handshake, and the handler sees a
connection with TLS established (``version()``, ``getpeercert()``,
``selected_alpn_protocol()``) as with the stdlib idiom.

Why not Twisted's TLS transport, or pyOpenSSL in the handler's thread:
measured on the persistent echo, a blocking handler behind Twisted's TLS
transport crosses threads twice per request (0.28-0.54 of a native Twisted
TLS server); pyOpenSSL driven from handler threads releases and retakes the
GIL on every one of its many small C calls, which with 16 busy handler
threads made it 0.24.  The ``ssl`` module releases the GIL only around real
I/O, like a plain socket.

**Forking servers**: the wrapped socket is handed to the child before its
handshake, and the child does the handshake with the context of
:meth:`TLSConfig.for_child` (``_forking.tls``: the policy and the files as
last loaded, Twisted-free), which the child's server also has as its
connection security (:meth:`TLSSecurity.for_child`).

**Connections Twisted's TLS carries** get the same facts through
:class:`TransportTLS` (``getpeercert``, ``version``, ``cipher``,
``selected_alpn_protocol``), which reads them off the transport.

How a connection ends: ``TCPServer.shutdown_request`` sends TLS's
``close_notify`` (if it can without waiting) before closing, as Twisted does,
so clients see a clean end rather than a truncated stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import ssl
import tempfile
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from txsocketserver._forking import tls as _child
from txsocketserver._forking.tls import send_close_notify
from txsocketserver._twisted import compat
from txsocketserver._twisted.interfaces import IConnectionSecurity

_log = Logger(namespace="txsocketserver")

#: The ``ssl:`` options txsocketserver adds to Twisted's.
TLS_OPTIONS = (
    "clientCA",
    "verifyClient",
    "minVersion",
    "maxVersion",
    "ciphers",
    "alpn",
    "handshakeTimeout",
)

#: Seconds a client has, from accept, to complete the TLS handshake, unless
#: ``handshakeTimeout=`` (or a smaller handler ``timeout``) says otherwise.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

#: ``minVersion=`` / ``maxVersion=`` values.
VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
#: ``verifyClient=`` values.
VERIFY_CLIENT = ("required", "optional")

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


# -- the description ---------------------------------------------------------------


def _fields(description: str) -> list[str]:
    """*description* split at its unescaped colons, each field kept as written."""
    fields, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _key_value(field: str) -> tuple[str, str] | None:
    """A field's ``key=value`` (unescaped), or ``None`` for a positional one."""
    match = re.match(r"((?:[^\\=]|\\.)*)=(.*)", field, re.DOTALL)
    if match is None:
        return None
    return _unescape(match.group(1)), _unescape(match.group(2))


def split_options(
    description: str, kinds: tuple[str, ...], names: tuple[str, ...]
) -> tuple[str, dict[str, str]]:
    """Take the options *names* out of *description* if its type is one of
    *kinds*; the rest stays written as it was, for Twisted to parse.

    Error handling:
        ``ValueError`` for an option given twice.
    """
    fields = _fields(description)
    if _unescape(fields[0]) not in kinds:
        return description, {}
    kept: list[str] = []
    ours: dict[str, str] = {}
    for field in fields:
        pair = _key_value(field)
        if pair is not None and pair[0] in names:
            if pair[0] in ours:
                raise ValueError(
                    f"{fields[0]}: option {pair[0]} is given twice in {description!r}"
                )
            ours[pair[0]] = pair[1]
        else:
            kept.append(field)
    return ":".join(kept), ours


def split_description(description: str) -> tuple[str, dict[str, str]]:
    """Take this module's options (:data:`TLS_OPTIONS`) out of an ``ssl:``
    (or ``haproxy:ssl:``) description.

    Returns:
        The description Twisted is given, and the options taken out (empty
        for any other kind of description, which is returned unchanged).

    Error handling:
        ``ValueError`` for an option given twice.
    """
    fields = _fields(description)
    kinds = [_unescape(field) for field in fields[:2]]
    if not (kinds[:1] == ["ssl"] or kinds == ["haproxy", "ssl"]):
        return description, {}
    kept: list[str] = []
    ours: dict[str, str] = {}
    for field in fields:
        pair = _key_value(field)
        if pair is not None and pair[0] in TLS_OPTIONS:
            if pair[0] in ours:
                raise ValueError(f"ssl: option {pair[0]} is given twice in {description!r}")
            ours[pair[0]] = pair[1]
        else:
            kept.append(field)
    return ":".join(kept), ours


# -- the policy ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TLSPolicy:
    """Everything an ``ssl:`` listener's TLS is made of, checked.

    ``verify_client`` is ``None`` (no client certificate asked for),
    ``"optional"`` or ``"required"``; ``max_version`` ``None`` means the
    newest the library supports; ``ciphers`` ``None`` the ``ssl`` module's
    default (forward-secret AEAD first); ``alpn`` the protocols offered, in
    the server's order of preference.
    """

    private_key: str
    certificate: str
    extra_chain: str | None = None
    dh_parameters: str | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    ciphers: str | None = None
    alpn: tuple[str, ...] = ()
    client_ca: str | None = None
    verify_client: str | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


def _bad(option: str, value: str, why: str) -> ValueError:
    return ValueError(f"ssl: option {option}={value!r}: {why}")


def policy_from(twisted_options: dict[str, Any], ours: dict[str, str]) -> TLSPolicy | None:
    """The policy of an ``ssl:`` description: Twisted's parsed options and
    ours (as :func:`split_description` took them out), or ``None`` if
    ``sslmethod`` names a method this module does not map (Twisted's TLS
    serves it then, without our options).

    Error handling:
        ``ValueError`` naming the option whose value is wrong.
    """
    method = twisted_options.get("sslmethod")
    if method is not None and method not in _PINNED_VERSIONS and method not in _ANY_VERSION:
        if ours:
            raise ValueError(
                f"ssl: option sslmethod={method!r} cannot be combined with {', '.join(ours)}"
            )
        return None
    fields: dict[str, Any] = {
        "private_key": twisted_options["privateKey"],
        "certificate": twisted_options.get("certKey") or twisted_options["privateKey"],
        "extra_chain": twisted_options.get("extraCertChain"),
        "dh_parameters": twisted_options.get("dhParameters"),
    }
    if method in _PINNED_VERSIONS:
        if "minVersion" in ours or "maxVersion" in ours:
            raise ValueError(
                f"ssl: option sslmethod={method!r} pins the version: "
                "use minVersion/maxVersion instead, not both"
            )
        fields["min_version"] = fields["max_version"] = _PINNED_VERSIONS[method]
    for option in ("minVersion", "maxVersion"):
        if option in ours:
            value = ours[option]
            if value not in VERSIONS:
                raise _bad(option, value, f"expected one of {', '.join(VERSIONS)}")
            fields["min_version" if option == "minVersion" else "max_version"] = VERSIONS[value]
    if fields.get("max_version") is not None and fields["max_version"] < fields.get(
        "min_version", ssl.TLSVersion.TLSv1_2
    ):
        raise _bad("maxVersion", ours.get("maxVersion", ""), "is below minVersion")
    if "ciphers" in ours:
        ciphers = ours["ciphers"]
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError:
            raise _bad("ciphers", ciphers, "OpenSSL accepts no cipher in this string") from None
        fields["ciphers"] = ciphers
    if "alpn" in ours:
        protocols = tuple(ours["alpn"].split(","))
        if not all(0 < len(p.encode("utf-8")) < 256 for p in protocols):
            raise _bad("alpn", ours["alpn"], "expected protocol names separated by commas")
        fields["alpn"] = protocols
    if "clientCA" in ours:
        path = ours["clientCA"]
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as error:
            raise _bad("clientCA", path, f"cannot load CA certificates: {error}") from None
        fields["client_ca"] = path
        fields["verify_client"] = "required"
    if "verifyClient" in ours:
        value = ours["verifyClient"]
        if value not in VERIFY_CLIENT:
            raise _bad("verifyClient", value, f"expected one of {', '.join(VERIFY_CLIENT)}")
        if "clientCA" not in ours:
            raise _bad("verifyClient", value, "needs clientCA=, the CAs to verify against")
        fields["verify_client"] = value
    if "handshakeTimeout" in ours:
        value = ours["handshakeTimeout"]
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not (seconds > 0 and math.isfinite(seconds)):
            raise _bad("handshakeTimeout", value, "expected a positive number of seconds")
        fields["handshake_timeout"] = seconds
    return TLSPolicy(**fields)


def policy_for_description(description: str) -> TLSPolicy | None:
    """The policy of an ``ssl:`` (or ``haproxy:ssl:``) *description*, with
    our options in it; ``None`` if it is not one this module serves.

    Error handling:
        ``ValueError`` naming the option whose value is wrong.
    """
    twisted_description, ours = split_description(description)
    if twisted_description.startswith("haproxy:"):
        twisted_description = twisted_description[len("haproxy:") :]
    chosen = compat.ssl_description_options(twisted_description)
    if chosen is None:
        return None
    return policy_from(chosen, ours)


# -- the contexts --------------------------------------------------------------------


def ssl_context(policy: TLSPolicy) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for the server side of *policy*.

    Besides the ``ssl`` module's defaults (no compression, TLS 1.2 or
    later), client-initiated renegotiation is refused.

    Error handling:
        ``OSError``/``ssl.SSLError`` for unreadable or mismatched files.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.minimum_version = policy.min_version
    if policy.max_version is not None:
        context.maximum_version = policy.max_version
    if policy.ciphers is not None:
        context.set_ciphers(policy.ciphers)
    if policy.alpn:
        context.set_alpn_protocols(list(policy.alpn))
    if policy.client_ca is not None:
        context.load_verify_locations(cafile=policy.client_ca)
        context.verify_mode = (
            ssl.CERT_REQUIRED if policy.verify_client == "required" else ssl.CERT_OPTIONAL
        )
    if policy.extra_chain is None:
        context.load_cert_chain(policy.certificate, policy.private_key)
    else:
        _load_with_chain(context, policy.certificate, policy.extra_chain, policy.private_key)
    if policy.dh_parameters is not None:
        context.load_dh_params(policy.dh_parameters)
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


_OPENSSL_VERSIONS = {
    ssl.TLSVersion.TLSv1: "TLS1_VERSION",
    ssl.TLSVersion.TLSv1_1: "TLS1_1_VERSION",
    ssl.TLSVersion.TLSv1_2: "TLS1_2_VERSION",
    ssl.TLSVersion.TLSv1_3: "TLS1_3_VERSION",
}


def openssl_context(policy: TLSPolicy) -> Any:
    """A pyOpenSSL ``Context`` for the server side of *policy*, the same
    settings as :func:`ssl_context`, for connections Twisted's TLS carries.

    Error handling:
        ``OSError``/``OpenSSL.SSL.Error`` for unreadable or mismatched files.
    """
    from OpenSSL import SSL, crypto

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_SINGLE_ECDH_USE
    )
    context.set_min_proto_version(getattr(SSL, _OPENSSL_VERSIONS[policy.min_version]))
    if policy.max_version is not None:
        context.set_max_proto_version(getattr(SSL, _OPENSSL_VERSIONS[policy.max_version]))
    # The ssl module's default list when none is given, so both paths agree.
    context.set_cipher_list(
        (policy.ciphers or _DEFAULT_CIPHERS).encode("ascii", "surrogateescape")
    )
    for path in (policy.certificate, policy.private_key):
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", path)
    context.use_certificate_chain_file(policy.certificate.encode())
    if policy.extra_chain is not None:
        with open(policy.extra_chain, "rb") as pem:
            for certificate in _PEM_CERTIFICATE.findall(pem.read()):
                context.add_extra_chain_cert(
                    crypto.load_certificate(crypto.FILETYPE_PEM, certificate)
                )
    context.use_privatekey_file(policy.private_key.encode())
    context.check_privatekey()
    if policy.dh_parameters is not None:
        context.load_tmp_dh(policy.dh_parameters.encode())
    if policy.client_ca is not None:
        context.load_verify_locations(policy.client_ca.encode())
        # The CA names sent to clients, so that they pick a certificate these CAs signed.
        context.load_client_ca(policy.client_ca.encode())
        flags = SSL.VERIFY_PEER
        if policy.verify_client == "required":
            flags |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        context.set_verify(flags, lambda connection, x509, errno, depth, ok: bool(ok))
    if policy.alpn:
        offered = [p.encode() for p in policy.alpn]

        def select(connection: Any, protocols: list[bytes]) -> Any:
            for protocol in offered:
                if protocol in protocols:
                    return protocol
            return SSL.NO_OVERLAPPING_PROTOCOLS

        context.set_alpn_select_callback(select)
    # Sessions resumed across this server's connections only.
    context.set_session_id(b"txsocketserver")
    return context


_DEFAULT_CIPHERS = ":".join(
    cipher["name"]
    for cipher in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()
    if cipher["protocol"] != "TLSv1.3"  # TLS 1.3's suites are not in the list
)


# -- one listener's TLS, reloadable ------------------------------------------------------

_live: weakref.WeakSet[TLSConfig] = weakref.WeakSet()
_live_lock = threading.Lock()


@implementer(IOpenSSLServerConnectionCreator)
class TLSConfig:
    """The TLS of one ``ssl:`` listener: its policy and current contexts.

    Made when the server is made (which checks every file and option);
    :meth:`reload` swaps the contexts.  It is also Twisted's
    ``IOpenSSLServerConnectionCreator`` for connections Twisted's TLS
    carries, each made from the context current at its accept.

    Args:
        description: the ``ssl:`` description, for the log lines.
        policy: what to make the contexts from.

    Error handling:
        ``ValueError`` naming ``privateKey``/``certKey`` and the reason when
        the files cannot be loaded.
    """

    def __init__(self, description: str, policy: TLSPolicy) -> None:
        self.description = description
        self.policy = policy
        self._lock = threading.Lock()
        self._openssl: Any = None
        self._wants_openssl = False
        try:
            self.context = ssl_context(policy)
            self._child = self._child_generation()
        except (OSError, ssl.SSLError) as error:
            raise ValueError(self._files_error(error)) from error
        with _live_lock:
            _live.add(self)

    def __repr__(self) -> str:
        return f"<TLSConfig {self.description!r}>"

    def _files_error(self, error: BaseException) -> str:
        policy = self.policy
        files = {
            "privateKey": policy.private_key,
            "certKey": policy.certificate,
            "extraCertChain": policy.extra_chain,
            "dhParameters": policy.dh_parameters,
            "clientCA": policy.client_ca,
        }
        named = ", ".join(f"{name}={path!r}" for name, path in files.items() if path)
        return f"ssl: cannot load {named}: {error}"

    def openssl_context(self) -> Any:
        """The current pyOpenSSL context (made on first use, then kept in step
        with :meth:`reload`).

        Error handling:
            ``ValueError`` as for the constructor.
        """
        with self._lock:
            if self._openssl is None:
                try:
                    self._openssl = openssl_context(self.policy)
                except Exception as error:
                    raise ValueError(self._files_error(error)) from error
                self._wants_openssl = True
            return self._openssl

    def _child_generation(self) -> _child.ChildTLS:
        return _child.ChildTLS(os.urandom(16), _child.read_material(self.description, self.policy))

    def for_child(self) -> _child.ChildTLS:
        """The TLS a forking server's child uses (``_forking.tls``): made
        from the files as this config last loaded them, so a reload reaches
        the next child, and a reload that failed does not."""
        return self._child

    def serverConnectionForTLS(self, protocol: Any) -> Any:  # noqa: N802 (Twisted's name)
        from OpenSSL import SSL

        return SSL.Connection(self.openssl_context(), None)

    def reload(self) -> None:
        """Read the key, certificate, chain (and CA) files again; new
        connections get the new contexts, established ones keep theirs.

        Error handling:
            ``ValueError`` saying what is wrong with the files; the contexts
            in use are then kept.
        """
        try:
            context = ssl_context(self.policy)
            fresh = openssl_context(self.policy) if self._wants_openssl else None
            child = self._child_generation()
        except Exception as error:
            raise ValueError(self._files_error(error)) from error
        with self._lock:
            self.context = context
            self._child = child
            if fresh is not None:
                self._openssl = fresh


def tls_configs(server: Any = None) -> list[TLSConfig]:
    """The live :class:`TLSConfig` objects of *server* (every one of the
    process if ``None``)."""
    with _live_lock:
        configs = list(_live)
    if server is None:
        return configs
    mine = []
    security = getattr(server, "_security", None)
    if isinstance(security, TLSSecurity):
        mine.append(security.config)
    endpoint = getattr(getattr(server, "_listener", None), "endpoint", None)
    config = getattr(endpoint, "_tls_config", None)
    if isinstance(config, TLSConfig):
        mine.append(config)
    return [c for c in configs if c in mine]


def reload_certificates(server: Any = None) -> list[tuple[str, str | None]]:
    """Read the certificate and key files of ``ssl:`` listeners again.

    What ``SIGHUP`` does to ``python -m txsocketserver`` and ``twistd
    socketserver``.  New TLS handshakes use the new files; established
    connections are untouched.  Any thread.

    Args:
        server: reload only this server's listeners; ``None``: every
            ``ssl:`` listener of the process.

    Returns:
        One ``(description, error)`` pair per listener: ``error`` is
        ``None`` if it reloaded, else what was wrong (its old certificate
        then stays in use).  Each outcome is logged too.
    """
    outcome: list[tuple[str, str | None]] = []
    for config in tls_configs(server):
        try:
            config.reload()
        except ValueError as error:
            _log.error(
                "certificate reload failed for {description}, keeping the old one: {error}",
                description=config.description,
                error=str(error),
            )
            outcome.append((config.description, str(error)))
        else:
            _log.info("certificate reloaded for {description}", description=config.description)
            outcome.append((config.description, None))
    return outcome


def server_context(description: str) -> TLSConfig | None:
    """The :class:`TLSConfig` for an ``ssl:`` endpoint *description*, or
    ``None`` if it has an ``sslmethod`` this module does not map (it is then
    served through Twisted's TLS, which does).

    Error handling:
        ``ValueError`` naming the option or file that is wrong.
    """
    policy = policy_for_description(description)
    if policy is None:
        return None
    return TLSConfig(description, policy)


# -- connections on the server's own socket ----------------------------------------------


@implementer(IConnectionSecurity)
class TLSSecurity:
    """TLS around each connection of an ``ssl:`` description, from *config*."""

    def __init__(self, config: TLSConfig) -> None:
        self.config = config

    @property
    def context(self) -> ssl.SSLContext:
        return self.config.context

    def wrap(self, request: socket.socket) -> ssl.SSLSocket:
        """The accepted socket as the server side of TLS; no I/O happens here."""
        try:
            wrapped = self.config.context.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False
            )
        except BaseException:
            request.close()
            raise
        # A forking server hands it to a child, which does the handshake.
        wrapped.for_child = self.config.for_child  # type: ignore[attr-defined]
        return wrapped

    def for_child(self) -> _child.ChildTLS:
        """What a forking server's child gets instead (``_forking.carry``)."""
        return self.config.for_child()

    def establish(self, request: Any, handler_class: Any) -> bool:
        # handshakeTimeout bounds the handshake, or the handler class's
        # timeout if that is shorter (it will bound the handler's reads).
        limit = _child.handshake_limit(self.config.policy.handshake_timeout, handler_class)
        return handshake(request, limit)

    def end(self, request: Any) -> None:
        send_close_notify(request)


def handshake(request: Any, timeout: float | None = None) -> bool:
    """Complete the TLS handshake of *request*, in the calling thread
    (``_forking.tls.handshake``, its failures logged here).

    Returns ``False`` if it did not complete: the client left, stalled or
    could not agree on TLS; the request is then closed like one that never
    came, as Twisted does.
    """
    return _child.handshake(request, timeout, _log.warn)


# -- connections Twisted's TLS carries ------------------------------------------------------


def decode_certificate(der: bytes) -> dict[str, Any]:
    """A DER certificate as ``ssl.SSLSocket.getpeercert()`` gives it.

    The ``ssl`` module decodes only from a file (its private
    ``_test_decode_cert``, there since Python 3.0); ``tests/test_tls_client.py``
    checks that both paths give the same dictionary.
    """
    handle, path = tempfile.mkstemp(prefix="txsocketserver-peer-", suffix=".pem")
    try:
        with os.fdopen(handle, "w") as pem:
            pem.write(ssl.DER_cert_to_PEM_cert(der))
        return ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined,no-any-return]
    finally:
        os.unlink(path)


class TransportTLS:
    """What ``ssl.SSLSocket`` tells a handler about its TLS, read off a
    Twisted TLS transport (``None`` answers where there is no TLS)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def _connection(self) -> Any:
        from OpenSSL import SSL
        from twisted.internet.interfaces import ISSLTransport

        transport: Any = self._transport
        for _ in range(8):
            if transport is None:
                return None
            if ISSLTransport.providedBy(transport):
                handle = transport.getHandle()  # type: ignore[attr-defined]

                return handle if isinstance(handle, SSL.Connection) else None
            transport = getattr(transport, "transport", None)
        return None

    def getpeercert(self, binary_form: bool = False) -> Any:
        connection = self._connection()
        if connection is None:
            raise ValueError("no TLS on this connection")
        certificate = connection.get_peer_certificate()
        if certificate is None:
            return None
        from OpenSSL import crypto

        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate)
        return der if binary_form else decode_certificate(der)

    def version(self) -> str | None:
        connection = self._connection()
        return None if connection is None else connection.get_protocol_version_name()

    def cipher(self) -> tuple[str, str, int] | None:
        connection = self._connection()
        if connection is None or connection.get_cipher_name() is None:
            return None
        return (
            connection.get_cipher_name(),
            connection.get_cipher_version(),
            connection.get_cipher_bits(),
        )

    def selected_alpn_protocol(self) -> str | None:
        connection = self._connection()
        if connection is None:
            return None
        chosen = connection.get_alpn_proto_negotiated()
        return chosen.decode("ascii", "replace") if chosen else None


# -- reloading on a signal ------------------------------------------------------------------


def reload_certificates_on_sighup(server: Any = None) -> bool:
    """Make ``SIGHUP`` reload the certificates of *server* (of every
    ``ssl:`` listener if ``None``); main thread only.

    Does nothing (and returns ``False``) when there is no ``ssl:`` listener,
    so ``SIGHUP`` keeps its default meaning for a server without TLS.  The
    reload runs on a thread of its own: a signal handler interrupts the
    main thread anywhere, holding any lock.
    """
    import signal

    if not tls_configs(server):
        return False

    def reload(signum: int, frame: Any) -> None:
        _log.info("SIGHUP: reloading certificates")
        threading.Thread(
            target=reload_certificates, args=(server,), name="txsocketserver-reload", daemon=True
        ).start()

    signal.signal(signal.SIGHUP, reload)
    return True


def unloadable(descriptions: Iterable[str]) -> list[str]:
    """What is wrong with the TLS files of each ``ssl:`` description, if
    anything: a ``--workers`` reload checks them before starting workers
    that would fail on them."""
    problems = []
    for description in descriptions:
        try:
            policy = policy_for_description(description)
            if policy is not None:
                ssl_context(policy)
        except (ValueError, OSError, ssl.SSLError) as error:
            problems.append(f"{description}: {error}")
    return problems
