# -*- test-case-name: tests.test_observability -*-
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

    def observe(self, server: Any, name: str | None = None) -> None:
        """Count what *server* does, labelled ``server=name`` (default: its address).

        The server's readiness joins ``/readyz``: ready while it listens.
        """
        label = name if name is not None else _label(server)
        stats = ServerStats(label, server)
        self._stats[label] = stats
        attach(server, stats)
        self.health.add_check(lambda: listening(server))

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


def attach(server: Any, observer: Any) -> None:
    """Make *observer* see every record of *server* (the lifecycle seam)."""
    server.add_observer(observer)
