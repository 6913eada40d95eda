# -*- test-case-name: tests.test_lifecycle -*-
"""The request lifecycle: one record per connection (per datagram), and its observers.

Every kind of server (synchronous, threading, forking, async, datagram; on a
socket of its own or fed by a Twisted endpoint) passes each connection through
the same four steps, made here and nowhere else:

``accepted``
    the connection exists (the listener accepted it; a datagram was read);
``refused``
    it will not be served: ``verify_request`` said no, a PROXY header was
    bad, late or from an untrusted peer, the TLS handshake failed;
``started``
    the handler is about to be made, or the request handed to a pool thread
    or a child process;
``ended``
    once per record, last: the request is over and its connection closed
    (for a forked request, when the template reports the child's exit).

An observer (metrics, an access log) attached with ``server.add_observer``
sees these calls; ``docs/architecture.md`` ("The request lifecycle") says
which thread makes each, for each kind of server, and which counts exist
where.  Observers are snapshot into the record when it is made, so each
observer sees a whole sequence.

Part of the Twisted-free core (see ``txsocketserver._core``).
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False  # not typing's: see txsocketserver._core
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    # At run time a plain base class (with no-op methods): the core imports no typing.
    Protocol = object

#: Why a connection was refused: ``record.outcome`` is ``"refused:" + reason``.
#: ``verify_request`` returned false.
VERIFY_REQUEST = "verify_request"
#: Closed to make room while every slot of ``request_queue_size`` was taken.
MAX_CONNECTIONS = "max_connections"
#: A PROXY-protocol connection from a peer that is not a trusted proxy.
UNTRUSTED_PROXY = "untrusted_proxy"
#: A bad, incomplete or late PROXY header.
PROXY_HEADER = "proxy_header"
#: The TLS handshake failed (or the client left during it).
TLS_HANDSHAKE = "tls_handshake"
#: Accepted, but the server stopped before a handler took it (an endpoint's queue).
STOPPING = "stopping"

#: Outcomes other than a refusal.
OK = "ok"
#: ``handle_error`` was called for the request.
ERROR = "error"
#: The request timed out (``idle_timeout``, or a socket timeout that reached ``handle_error``).
TIMEOUT = "timeout"
#: The client reset the connection (what reached ``handle_error``, or an async connection's end).
RESET = "reset"


class ConnectionRecord:
    """What is known of one connection (one datagram, for a datagram server).

    Observers read it; the server fills it in as the connection moves on.

    What it holds:

    - ``server``: the server.
    - ``peer``: the address the connection came from (the proxy's, when a
      PROXY header named the client).
    - ``client_address``: the address the handler sees (``None`` before the
      PROXY header names it).
    - ``accepted_at``: ``time.time()`` at accept.
    - ``started``: ``time.monotonic()`` when the request started (``None``:
      it never did).
    - ``ended``: ``time.monotonic()`` when it ended (``None`` until then).
    - ``bytes_received``, ``bytes_sent``: payload bytes, or ``None`` where
      the server cannot see them (a handler on a real socket reads and writes
      it directly; see ``docs/architecture.md``).
    - ``outcome``: ``"ok"``, ``"error"`` (``handle_error`` was called),
      ``"timeout"``, ``"reset"``, or ``"refused:REASON"`` (see the reason
      constants of ``txsocketserver._core.lifecycle``).
    - ``details``: ``None``, or a dict of extras: ``"proxy"`` (the PROXY
      header's source and destination), ``"tls"`` (``True`` on a TLS
      connection of an async server), ``"exit_code"`` (a forked request's
      child).
    - ``observers``: the observers this record tells (those attached when it
      was made).
    """

    __slots__ = (
        "server",
        "peer",
        "client_address",
        "accepted_at",
        "started",
        "ended",
        "bytes_received",
        "bytes_sent",
        "outcome",
        "details",
        "observers",
    )

    def __init__(
        self, server: Any, peer: Any, client_address: Any, observers: tuple[Any, ...]
    ) -> None:
        self.server = server
        self.peer = peer
        self.client_address = client_address
        self.accepted_at = time.time()
        self.started: float | None = None
        self.ended: float | None = None
        self.bytes_received: int | None = None
        self.bytes_sent: int | None = None
        self.outcome = OK
        self.details: dict[str, Any] | None = None
        self.observers = observers

    def __repr__(self) -> str:
        return (
            f"<ConnectionRecord {self.client_address!r} (peer {self.peer!r}) {self.outcome}"
            f"{' ended' if self.ended is not None else ''}>"
        )


class LifecycleObserver(Protocol):
    """What ``server.add_observer()`` takes: any object with these four methods.

    Deriving from this class is optional (it gives no-op defaults).  Each
    method is called on whichever thread the step happens on (the serving
    thread, a pool thread, the reactor thread), so it must be quick and
    thread-safe.  An observer that raises is logged once, and serving goes on.
    """

    def accepted(self, record: ConnectionRecord) -> None:
        """A connection was accepted (a datagram read)."""

    def refused(self, record: ConnectionRecord) -> None:
        """It will not be served; ``record.outcome`` is ``"refused:REASON"``."""

    def started(self, record: ConnectionRecord) -> None:
        """Its handler is about to be made, or it is handed to a thread or child."""

    def ended(self, record: ConnectionRecord) -> None:
        """Last, once per record: outcome and byte counts are final."""


# Observers that raised once already (by id: an observer need not be hashable).
_failed_observers: set[int] = set()


def _tell(record: ConnectionRecord, event: str) -> None:
    for observer in record.observers:
        try:
            getattr(observer, event)(record)
        except Exception:
            if id(observer) not in _failed_observers:
                _failed_observers.add(id(observer))
                import logging

                logging.getLogger("txsocketserver").warning(
                    "lifecycle observer %r raised in %s(); serving goes on, and its "
                    "further errors are not logged",
                    observer,
                    event,
                    exc_info=True,
                )


def accepted(server: Any, peer: Any, client_address: Any = None) -> ConnectionRecord | None:
    """A connection (datagram) arrived: its record, or ``None`` with no observer attached."""
    observers = server._observers
    if not observers:
        return None
    record = ConnectionRecord(server, peer, client_address, observers)
    _tell(record, "accepted")
    return record


def refused(record: ConnectionRecord, reason: str) -> None:
    """It will not be served, for *reason* (one of this module's constants);
    nothing once the record has ended."""
    if record.ended is not None:
        return
    record.outcome = "refused:" + reason
    _tell(record, "refused")


def started(record: ConnectionRecord) -> None:
    record.started = time.monotonic()
    _tell(record, "started")


def failed(record: ConnectionRecord, error: BaseException | None = None) -> None:
    """``handle_error`` is being called for it (*error*: the current exception by
    default): the outcome becomes ``error``, ``timeout`` or ``reset``, unless
    something was already recorded."""
    if record.outcome != OK:
        return
    if error is None:
        error = sys.exc_info()[1]
    if isinstance(error, TimeoutError):
        record.outcome = TIMEOUT
    elif isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        record.outcome = RESET
    else:
        record.outcome = ERROR


def timed_out(record: ConnectionRecord) -> None:
    """It is closed for making no progress (``idle_timeout``)."""
    if record.outcome == OK:
        record.outcome = TIMEOUT


def reset(record: ConnectionRecord) -> None:
    """The client reset the connection while it was served."""
    if record.outcome == OK:
        record.outcome = RESET


def ended(record: ConnectionRecord, outcome: str | None = None) -> None:
    """The record is over (once: later calls do nothing).  *outcome* replaces an ``ok`` one."""
    if record.ended is not None:
        return
    if outcome is not None and record.outcome == OK:
        record.outcome = outcome
    record.ended = time.monotonic()
    _tell(record, "ended")


def add_detail(record: ConnectionRecord, name: str, value: Any) -> None:
    if record.details is None:
        record.details = {}
    record.details[name] = value
