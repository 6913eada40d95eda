# -*- test-case-name: tests.test_observability,tests.test_observability_interop -*-
"""Snapshots as Prometheus metric families, through ``prometheus_client``.

``prometheus_client`` is the optional extra ``txsocketserver[metrics]``:
:func:`require_prometheus` is the one place that imports it for a caller who
asked for metrics, and says which extra to install when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from txsocketserver._observability.stats import DURATION_BUCKETS

PREFIX = "txsocketserver_"
EXTRA_HINT = (
    "metrics need prometheus_client: install the extra with pip install 'txsocketserver[metrics]'"
)

#: Each counter of a snapshot: (metric name without prefix and _total, help).
_COUNTERS = {
    "connections_accepted": (
        "connections_accepted",
        "Connections accepted (stream servers; before verify_request).",
    ),
    "requests_started": (
        "requests_started",
        "Requests handed to a handler (after verify_request).",
    ),
    "requests_finished": ("requests", "Requests whose handling is over, failed or not."),
    "requests_failed": ("requests_failed", "Requests whose handler raised (handle_error called)."),
    "bytes_received": (
        "received_bytes",
        "Bytes received from clients, where the server sees them (see operations.md).",
    ),
    "bytes_sent": (
        "sent_bytes",
        "Bytes sent to clients, where the server sees them (see operations.md).",
    ),
    "datagrams_received": ("datagrams_received", "Datagrams received (datagram servers)."),
}

#: Worker restart causes, always exposed (a counter that appears late breaks rate()).
RESTART_CAUSES = ("exited", "timed_out", "max_requests", "max_memory", "max_lifetime", "reload")


def require_prometheus() -> Any:
    """``prometheus_client``, or ``ImportError`` naming the extra to install."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(EXTRA_HINT) from exc
    return prometheus_client


class SnapshotCollector:
    """A ``prometheus_client`` collector of the servers' snapshots.

    Args:
        servers: returns ``{server label: snapshot}`` (see
            :meth:`~txsocketserver._observability.stats.ServerStats.snapshot`)
            at each scrape.
        workers: with ``--workers``, returns ``{"alive": n, "restarts":
            {cause: n}}``; ``None`` otherwise.
    """

    def __init__(
        self,
        servers: Callable[[], dict[str, dict[str, Any]]],
        workers: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self._servers = servers
        self._workers = workers

    def describe(self) -> list[Any]:
        # Nothing to check at registration (our names are ours alone): an
        # empty description keeps the registry from scraping us early.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snapshots = self._servers()
        for key, (name, documentation) in _COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, documentation, labels=["server"])
            for server, snapshot in snapshots.items():
                family.add_metric([server], snapshot.get(key, 0))
            yield family
        refused = CounterMetricFamily(
            PREFIX + "connections_refused",
            "Connections refused, by reason: verify_request, max_connections, "
            "untrusted_proxy, proxy_header, tls_handshake.",
            labels=["server", "reason"],
        )
        for server, snapshot in snapshots.items():
            for reason, count in sorted(snapshot.get("refused", {}).items()):
                refused.add_metric([server, reason], count)
        yield refused
        duration = HistogramMetricFamily(
            PREFIX + "request_duration_seconds",
            "Seconds from a request's start (handed to its handler) to its end.",
            labels=["server"],
        )
        for server, snapshot in snapshots.items():
            buckets = snapshot.get("buckets") or [0] * (len(DURATION_BUCKETS) + 1)
            cumulative, running = [], 0
            for bound, count in zip((*DURATION_BUCKETS, float("inf")), buckets, strict=True):
                running += count
                cumulative.append((_bound(bound), running))
            duration.add_metric([server], cumulative, snapshot.get("duration_sum", 0.0))
        yield duration
        yield from self._gauges(snapshots, GaugeMetricFamily)
        workers = None if self._workers is None else self._workers()
        if workers is not None:
            yield GaugeMetricFamily(
                PREFIX + "workers",
                "Worker processes alive (started and not yet exited).",
                value=workers["alive"],
            )
            restarts = CounterMetricFamily(
                PREFIX + "worker_restarts",
                "Workers replaced, by cause: exited (died), timed_out (--worker-timeout), "
                "max_requests, max_memory, max_lifetime (recycled), reload (SIGHUP).",
                labels=["cause"],
            )
            for cause in RESTART_CAUSES:
                restarts.add_metric([cause], workers["restarts"].get(cause, 0))
            yield restarts

    @staticmethod
    def _gauges(snapshots: dict[str, dict[str, Any]], gauge: Any) -> Iterator[Any]:
        active = gauge(
            PREFIX + "connections_active",
            "Requests in flight: connections (datagrams) between verify_request and their end.",
            labels=["server"],
        )
        threads = gauge(
            PREFIX + "pool_threads",
            "Pool threads of a threading server, busy (running a request) or idle.",
            labels=["server", "state"],
        )
        waiting = gauge(
            PREFIX + "pool_waiting_requests",
            "Requests of a threading server waiting for a pool thread (at max_threads).",
            labels=["server"],
        )
        children = gauge(
            PREFIX + "children",
            "Child processes of a forking server running a request.",
            labels=["server"],
        )
        for server, snapshot in snapshots.items():
            gauges = snapshot.get("gauges", {})
            if "active" in gauges:
                active.add_metric([server], gauges["active"])
            if "threads_busy" in gauges:
                threads.add_metric([server, "busy"], gauges["threads_busy"])
                threads.add_metric([server, "idle"], gauges["threads_idle"])
                waiting.add_metric([server], gauges.get("requests_waiting", 0))
            if "children" in gauges:
                children.add_metric([server], gauges["children"])
        yield from (active, threads, waiting, children)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def exposition(registry: Any, accept: str | None = None) -> tuple[bytes, str]:
    """The registry's text exposition and its content type (OpenMetrics if *accept* asks)."""
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
