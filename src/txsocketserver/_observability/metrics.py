"""``Metrics``: the metrics, liveness and readiness of the servers of one process.

What a program (or a ``.tac``) uses to get what ``--metrics`` gives::

    metrics = txsocketserver.Metrics()            # needs txsocketserver[metrics]
    metrics.observe(server, name="api")           # count what server does
    metrics.listen("tcp:9100:interface=127.0.0.1")  # /metrics, /livez, /readyz

or, to put the same metrics in a registry of its own::

    metrics = txsocketserver.Metrics(registry=my_registry)

See ``docs/operations.md`` for each metric.
"""

from __future__ import annotations

import _thread
import time
from collections.abc import Callable
from typing import Any

from txsocketserver._observability.exposition import SnapshotCollector, require_prometheus
from txsocketserver._observability.health import Health
from txsocketserver._observability.stats import ServerStats


class Metrics:
    """Prometheus metrics, liveness and readiness for the servers of one process.

    Args:
        registry: a ``prometheus_client`` ``CollectorRegistry`` to put the
            metrics in; default: a new one of this object's own, which also
            gets ``prometheus_client``'s process and platform collectors.
        health: the :class:`Health` that ``/readyz`` answers from (default:
            a new one).

    Error handling:
        ``ImportError`` naming the extra (``txsocketserver[metrics]``) when
        ``prometheus_client`` is not installed.
    """

    def __init__(self, *, registry: Any = None, health: Health | None = None) -> None:
        prometheus = require_prometheus()
        self.health = health if health is not None else Health()
        self._stats: dict[str, ServerStats] = {}
        self._sources: list[Callable[[], dict[str, dict[str, Any]]]] = []
        self._workers: Callable[[], dict[str, Any]] | None = None
        if registry is None:
            registry = prometheus.CollectorRegistry()
            prometheus.ProcessCollector(registry=registry)
            prometheus.PlatformCollector(registry=registry)
        self.registry = registry
        registry.register(SnapshotCollector(self.snapshots, self._workers_now))

    def observe(self, server: Any, name: str | None = None) -> ServerStats:
        """Count what *server* does, labelled ``server=name`` (default: its address).

        The server's readiness joins ``/readyz``: ready while it listens.
        Returns the :class:`ServerStats` attached to it.
        """
        label = name if name is not None else _label(server)
        stats = ServerStats(label, server)
        self._stats[label] = stats
        attach(server, stats)
        self.health.add_check(lambda: listening(server))
        return stats

    def add_source(self, source: Callable[[], dict[str, dict[str, Any]]]) -> None:
        """Add servers counted elsewhere: *source* returns ``{label: snapshot}``
        at each scrape (the ``--workers`` supervisor's sum over its workers)."""
        self._sources.append(source)

    def set_workers(self, workers: Callable[[], dict[str, Any]]) -> None:
        """Expose the worker gauges: *workers* returns ``{"alive": n,
        "restarts": {cause: n}}`` at each scrape."""
        self._workers = workers

    def snapshots(self) -> dict[str, dict[str, Any]]:
        """``{server label: snapshot}`` of every server, observed or added."""
        snapshots = {label: stats.snapshot() for label, stats in self._stats.items()}
        for source in self._sources:
            snapshots.update(source())
        return snapshots

    def _workers_now(self) -> dict[str, Any] | None:
        return None if self._workers is None else self._workers()

    def listen(self, description: str, reactor: Any = None) -> Any:
        """Serve ``/metrics``, ``/livez`` and ``/readyz`` on the server endpoint
        *description* (a Deferred firing with the listening port).

        Call it on the reactor thread, or before the reactor runs; from a
        blocking program, :meth:`listen_blocking`.
        """
        from txsocketserver._observability.http import listen_metrics

        return listen_metrics(description, self.registry, self.health, reactor)

    def listen_blocking(self, description: str) -> Any:
        """:meth:`listen` from a blocking program (any thread but the
        reactor's): returns the listening port once it listens, or raises
        why it cannot.  Stop it with ``port.stopListening()`` on the reactor
        thread."""
        from txsocketserver._twisted.reactor import call_in_reactor

        return call_in_reactor(self.listen, description)

    def observe_workers(self, workers: Any) -> None:
        """Expose the sum over a :class:`~txsocketserver.Workers`' workers
        (made with ``observability={"metrics": True}``) and its worker gauges;
        readiness then needs a serving worker."""
        self.add_source(workers.metrics_snapshots)
        self.set_workers(workers.worker_counts)
        self.health.add_check(lambda: bool(workers.pids))


def _label(server: Any) -> str:
    address = getattr(server, "server_address", None)
    description = getattr(address, "description", None)
    if description is not None:
        return str(description)
    from txsocketserver._observability.access_log import address_text

    return address_text(address) or type(server).__name__


def listening(server: Any) -> bool:
    """Whether *server* is listening (its socket open, or its endpoint's port up)."""
    listener = getattr(server, "_listener", None)
    port = getattr(listener, "_port", _ABSENT)
    if port is not _ABSENT:
        return port is not None
    sock = getattr(server, "socket", None)
    try:
        return sock is not None and sock.fileno() >= 0
    except OSError:
        return False


_ABSENT = object()


# -- attaching an observer to a server --------------------------------------------


class _Record:
    """A request's record (the lifecycle seam's ``ConnectionRecord`` shape)."""

    __slots__ = (
        "server", "peer", "client_address", "accepted_at", "started", "ended",
        "bytes_received", "bytes_sent", "outcome", "details",
    )  # fmt: skip

    def __init__(self, server: Any, client_address: Any) -> None:
        self.server = server
        self.peer = client_address
        self.client_address = client_address
        self.accepted_at = time.time()
        self.started: float | None = None
        self.ended: float | None = None
        self.bytes_received: int | None = None
        self.bytes_sent: int | None = None
        self.outcome = "ok"
        self.details: dict[str, Any] | None = None


class _Fanout:
    """Several observers of one server, as one; an observer that raises is
    logged once and then left alone."""

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self._failed: set[int] = set()

    def _each(self, step: str, record: Any) -> None:
        for observer in self.observers:
            try:
                getattr(observer, step)(record)
            except Exception:
                if id(observer) not in self._failed:
                    self._failed.add(id(observer))
                    import logging

                    logging.getLogger("txsocketserver").exception(
                        "lifecycle observer %r failed (logged once)", observer
                    )


def attach(server: Any, observer: Any) -> None:
    """Make *observer* see every record of *server*.

    Uses the server's ``add_observer`` where there is one (the lifecycle
    seam); otherwise wraps the narrowest points of this instance:
    ``verify_request`` (accepted, or refused with reason ``verify_request``),
    the start and end of a request in flight, and ``handle_error``.
    """
    add_observer = getattr(server, "add_observer", None)
    if add_observer is not None:
        add_observer(observer)
        return
    fanout = server.__dict__.get("_observability_fanout")
    if fanout is None:
        fanout = server.__dict__["_observability_fanout"] = _Fanout()
        _wrap(server, fanout)
    fanout.observers.append(observer)


def _wrap(server: Any, fanout: _Fanout) -> None:
    records: dict[int, _Record] = {}
    lock = _thread.allocate_lock()
    verify_request = server.verify_request
    request_started = server._request_started
    request_finished = server._request_finished
    handle_error = server.handle_error

    def observed_verify_request(request: Any, client_address: Any) -> bool:
        record = _Record(server, client_address)
        fanout._each("accepted", record)
        if verify_request(request, client_address):
            with lock:
                records[id(request)] = record
            return True
        record.outcome = "refused:verify_request"
        fanout._each("refused", record)
        fanout._each("ended", record)
        return False

    def observed_request_started(request: Any) -> None:
        with lock:
            record = records.get(id(request))
        if record is not None:
            record.started = time.monotonic()
            fanout._each("started", record)
        request_started(request)

    def observed_handle_error(request: Any, client_address: Any) -> None:
        with lock:
            record = records.get(id(request))
        if record is not None:
            record.outcome = "error"
        handle_error(request, client_address)

    def observed_request_finished(request: Any) -> None:
        request_finished(request)
        with lock:
            record = records.pop(id(request), None)
        if record is not None:
            record.ended = time.monotonic()
            fanout._each("ended", record)

    server.verify_request = observed_verify_request
    server._request_started = observed_request_started
    server.handle_error = observed_handle_error
    server._request_finished = observed_request_finished
