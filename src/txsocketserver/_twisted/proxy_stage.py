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


def begin_header_stage(
    transport: Any,
    policy: ProxyHeaderPolicy,
    reactor: Any,
    on_header: Callable[[ProxyHeader], None],
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
            stand); the stage is over by then.
        record: the connection's lifecycle record, if observed: a refusal
            is recorded on it, and the header's addresses.
    """

    def __init__(
        self,
        transport: Any,
        peer: Any,
        policy: ProxyHeaderPolicy,
        reactor: Any,
        on_header: Callable[[ProxyHeader], None],
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

    @property
    def active(self) -> bool:
        """Whether the connection is still in its header stage."""
        return self._received is not None

    def begin(self) -> bool:
        """At ``connectionMade``: admit the peer or refuse it (``False``, closed)."""
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
        self._end()
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
        return payload

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
            self.peer_ended("closed" if isinstance(reason.value, ConnectionDone) else "was reset")

    def peer_ended(self, how: str) -> None:
        """The peer ended the connection in the stage (*how*: "closed", "was reset")."""
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

    def _timed_out(self) -> None:
        self._deadline = None
        if self._received is not None:
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
