# -*- test-case-name: tests.test_proxy_protocol,tests.test_haproxy_interop,tests.test_lifecycle -*-
"""The PROXY header stage of a connection: what any protocol behind ``haproxy:`` reads first.

Both the blocking handlers' protocol (``transport_socket``) and the async
handlers' (``_async.protocol``) begin a proxied connection with
:func:`begin_header_stage`, and hand it their bytes (``feed``) and their
ends (``read_lost``, ``connection_lost``) while it is active; the parsing and
the trust rule are in ``proxy_protocol``.  The stage:

* refuses at once a peer that is not a trusted proxy (its header could claim
  any address);
* buffers the bytes until :func:`~txsocketserver._twisted.proxy_protocol.parse_header`
  has a whole header, however the proxy split it; what follows it is payload;
* bounds itself with a deadline (``timeout``): a silent client, or one that
  stops inside its header, is closed;
* serves a ``LOCAL`` connection (the proxy's health check: a TCP check
  closes at once, an HTTP check waits for its answer) with the connection's
  own addresses, as the PROXY specification says;
* logs one line for every connection that ends in it: a warning for a
  refusal, a bad header or the deadline; info for an end inside the header;
  debug for an end before any byte (a TCP health check, a port scanner).

The same stage runs the TLS handshake of connections whose TLS Twisted
carries but our policy makes (``policy.tls``: async handlers on ``ssl:``, and
``haproxy:ssl:``, whose TLS begins *after* the PROXY header, as HAProxy's
``send-proxy`` to a TLS server sends it): it starts TLS on the transport,
hands it whatever followed the header, and ends when the handshake
completes (the protocol forwards Twisted's ``handshakeCompleted`` to
``tls_established``), within the policy's ``handshakeTimeout``; a failed
handshake is logged with its reason and refused as ``tls_handshake``.  With
``policy.header`` false there is no PROXY header: the stage is the
handshake alone.

Reactor thread only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from txsocketserver._core import lifecycle
from txsocketserver._twisted.addresses import socket_address
from txsocketserver._twisted.proxy_protocol import (
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    parse_header,
)

_log = Logger(namespace="txsocketserver")


class ProxyHeaderPolicy(NamedTuple):
    """How connections behind the PROXY protocol are admitted.

    ``trusted``: the peers whose header is believed; ``timeout``: seconds from
    accept for the whole header to arrive (``None``: no deadline).
    """

    trusted: TrustedProxies
    timeout: float | None
    #: The TLS to start once the header is read (a ``tls.TLSConfig``), or None.
    tls: Any = None
    #: Whether a PROXY header comes first (false: the stage is TLS alone).
    header: bool = True


def begin_header_stage(
    transport: Any,
    policy: ProxyHeaderPolicy,
    reactor: Any,
    on_header: Callable[[ProxyHeader | None], None],
    record: lifecycle.ConnectionRecord | None = None,
) -> ProxyHeaderStage:
    """At a proxied connection's ``connectionMade``: its header stage, begun
    (the peer admitted, or refused and the connection closed).  See
    :class:`ProxyHeaderStage` for the arguments."""
    stage = ProxyHeaderStage(
        transport, socket_address(transport.getPeer()), policy, reactor, on_header, record
    )
    stage.begin()
    return stage


class ProxyHeaderStage:
    """The header stage of one connection.

    Args:
        transport: the connection's transport (closed here on a refusal).
        peer: the address the connection comes from, as ``socket.accept()``
            gives it (for the trust rule and the log lines).
        policy: whom to believe, and the deadline.
        reactor: runs the deadline.
        on_header: called with the header once it is whole (for ``LOCAL``
            too, whose ``family`` is ``None``: the connection's own addresses
            stand), and with TLS once the handshake completed (``None`` if
            there was no header); the stage is over by then.
        record: the connection's lifecycle record, if observed: a refusal
            is recorded on it, and the header's addresses.
    """

    def __init__(
        self,
        transport: Any,
        peer: Any,
        policy: ProxyHeaderPolicy,
        reactor: Any,
        on_header: Callable[[ProxyHeader | None], None],
        record: lifecycle.ConnectionRecord | None = None,
    ) -> None:
        self._transport = transport
        self._record = record
        self._peer = peer
        self._policy = policy
        self._reactor = reactor
        self._on_header = on_header
        # The header's bytes so far; None once the stage is over.
        self._received: bytearray | None = None
        self._deadline: Any = None
        # Once TLS started: the header read before it (None: no header).
        self._tls_started = False
        self._header: ProxyHeader | None = None

    @property
    def active(self) -> bool:
        """Whether the connection is still in its header stage."""
        return self._received is not None

    def begin(self) -> bool:
        """At ``connectionMade``: admit the peer or refuse it (``False``, closed)."""
        if not self._policy.header:
            self._received = bytearray()
            self._start_tls(b"")
            return True
        peer = self._peer
        if not self._policy.trusted.trusts(peer):
            _log.warn(
                "refused connection from {peer}: not a trusted proxy (trusted: {trusted}), "
                "so its PROXY header cannot be believed",
                peer=peer,
                trusted=", ".join(self._policy.trusted.entries) or "none",
            )
            if self._record is not None:
                lifecycle.refused(self._record, lifecycle.UNTRUSTED_PROXY)
            self._transport.loseConnection()
            return False
        self._received = bytearray()
        if self._policy.timeout is not None:
            self._deadline = self._reactor.callLater(self._policy.timeout, self._timed_out)
        return True

    def feed(self, data: bytes) -> bytes:
        """Bytes that arrived in the stage; returns the payload after a whole
        header (``b""`` while the header is incomplete or the stage ended)."""
        assert self._received is not None
        self._received += data
        try:
            header = parse_header(self._received)
        except ProxyHeaderError as error:
            self._end("warn", "refused connection from {peer}: {reason}", error)
            if self._record is not None:
                lifecycle.refused(self._record, lifecycle.PROXY_HEADER)
            self._transport.loseConnection()
            return b""
        if header is None:
            return b""
        payload = bytes(self._received[header.length :])
        if self._policy.tls is not None:
            self._header = header
            self._start_tls(payload)
            return b""
        self._end()
        self._admit(header)
        return payload

    def _admit(self, header: ProxyHeader | None) -> None:
        """The stage is over: hand the connection on."""
        if header is None:
            self._on_header(None)
            return
        record = self._record
        if record is not None and header.family is not None:
            record.client_address = header.source
            lifecycle.add_detail(
                record, "proxy", {"source": header.source, "destination": header.destination}
            )
        if header.local:
            # The proxy speaks for itself (HAProxy's health checks): the PROXY
            # spec says to serve it with the connection's own addresses, and
            # an HTTP check waits for its answer.
            _log.debug(
                "PROXY LOCAL connection (a health check) from {peer}: served as the proxy's own",
                peer=self._peer,
            )
        self._on_header(header)

    def _start_tls(self, payload: bytes) -> None:
        """Begin the TLS handshake on the transport; *payload* (what came
        after the header) is its first bytes."""
        self._tls_started = True
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
        self._deadline = self._reactor.callLater(
            self._policy.tls.policy.handshake_timeout, self._timed_out
        )
        self._transport.startTLS(self._policy.tls)
        if payload:
            # startTLS made the TLS layer the transport's protocol.
            self._transport.protocol.dataReceived(payload)

    def tls_established(self) -> None:
        """The TLS handshake completed (Twisted's ``handshakeCompleted``)."""
        if self._received is None or not self._tls_started:
            return
        self._end()
        self._admit(self._header)

    def read_lost(self) -> bool:
        """The peer half-closed (``readConnectionLost``): inside the stage
        that ends the connection; whether it did (the protocol then has
        nothing more to do)."""
        if self._received is None:
            return False
        self.peer_ended("closed")
        self._transport.loseConnection()
        return True

    def connection_lost(self, reason: Failure) -> None:
        """``connectionLost``: inside the stage, the peer left in its header."""
        if self._received is not None:
            self.peer_ended(
                "closed" if isinstance(reason.value, ConnectionDone) else "was reset", reason
            )

    def peer_ended(self, how: str, reason: Failure | None = None) -> None:
        """The peer ended the connection in the stage (*how*: "closed", "was
        reset"; *reason*: the failure, if known)."""
        if self._tls_started:
            self._tls_ended(how, reason)
            return
        if self._record is not None:
            if self._received:
                lifecycle.refused(self._record, lifecycle.PROXY_HEADER)
            elif how != "closed":
                self._record.outcome = lifecycle.RESET
        if self._received:
            self._end(
                "info",
                "connection from {peer} " + how + " inside its PROXY header ({received} bytes)",
            )
        else:
            self._end("debug", "connection from {peer} " + how + " before sending anything")

    def evict(
        self, reason: str, level: str = "warn", refusal: str = lifecycle.PROXY_HEADER
    ) -> None:
        """Close the connection, logging *reason* at *level* (a
        ``twisted.logger`` level name); *refusal*: the lifecycle's reason."""
        if self._record is not None:
            lifecycle.refused(self._record, refusal)
        self._end(level, "closed connection from {peer}: {reason}", reason)
        self._transport.loseConnection()

    def _tls_ended(self, how: str, reason: Failure | None) -> None:
        """The connection ended during its TLS handshake."""
        error = None if reason is None else reason.value
        if error is not None and type(error).__module__.startswith("OpenSSL"):
            if self._record is not None:
                lifecycle.refused(self._record, lifecycle.TLS_HANDSHAKE)
            self._end("warn", "TLS handshake with {peer} failed: {reason}", _ssl_reason(error))
            return
        if self._record is not None and how != "closed":
            self._record.outcome = lifecycle.RESET
        self._end("info", "connection from {peer} " + how + " during its TLS handshake")

    def _timed_out(self) -> None:
        self._deadline = None
        if self._received is None:
            return
        if self._tls_started:
            seconds = self._policy.tls.policy.handshake_timeout
            if self._record is not None:
                lifecycle.refused(self._record, lifecycle.TLS_HANDSHAKE)
            self._end("warn", "TLS handshake with {peer} timed out after {reason}s", seconds)
            # Not loseConnection: that would wait to send TLS's close_notify.
            self._transport.abortConnection()
        else:
            self.evict(f"no complete PROXY header within {self._policy.timeout}s")

    def _end(self, level: str = "", message: str = "", reason: object = "") -> None:
        if level:
            getattr(_log, level)(
                message,
                peer=self._peer,
                reason=reason,
                received=len(self._received or b""),
            )
        self._received = None
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()


def _ssl_reason(error: Any) -> str:
    """OpenSSL's reason in a pyOpenSSL error (its last entry's third field)."""
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    for entry in reversed(entries):
        if isinstance(entry, tuple) and len(entry) == 3:
            return str(entry[2])
    return str(error)
