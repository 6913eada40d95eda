# -*- test-case-name: tests.test_observability -*-
"""The counts behind the metrics: one :class:`ServerStats` per server.

A ``ServerStats`` is a lifecycle observer (``accepted``, ``refused``,
``started``, ``ended``: see ``txsocketserver._core.lifecycle``) that adds up
what it is told, under one lock, on whichever thread the step happens; it
knows neither Prometheus nor Twisted.  Its :meth:`~ServerStats.snapshot` is a
plain JSON-able dict, which is what a ``--workers`` worker sends to the
supervisor and what :mod:`.exposition` turns into metric families, summed over
any number of snapshots (:func:`merge`).

Gauges that are state rather than events (connections active, pool threads,
children running) are read from the server when a snapshot is taken.
"""

from __future__ import annotations

import _thread
import bisect

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: Upper bounds (seconds) of the handler-duration histogram's buckets.
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: The counters of a snapshot (each an int), in exposition order.
COUNTERS = (
    "connections_accepted",
    "requests_started",
    "requests_finished",
    "requests_failed",
    "bytes_received",
    "bytes_sent",
    "datagrams_received",
)


class ServerStats:
    """What one server has done, counted as it happens (thread-safe).

    Args:
        name: the ``server`` label: the listen description, or a name the
            user gives.
        server: the server, read for its gauges at snapshot time (``None``:
            no gauges).
    """

    def __init__(self, name: str, server: Any = None) -> None:
        self.name = name
        self.server = server
        self.datagram = getattr(server, "socket_type", None) == 2  # socket.SOCK_DGRAM
        self._lock = _thread.allocate_lock()
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._refused: dict[str, int] = {}
        self._buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last: above every bound
        self._duration_sum = 0.0

    # -- the lifecycle observer ---------------------------------------------------

    def accepted(self, record: Any) -> None:
        with self._lock:
            self._counts["datagrams_received" if self.datagram else "connections_accepted"] += 1

    def refused(self, record: Any) -> None:
        reason = record.outcome.partition(":")[2] or "unknown"
        with self._lock:
            self._refused[reason] = self._refused.get(reason, 0) + 1

    def started(self, record: Any) -> None:
        with self._lock:
            self._counts["requests_started"] += 1

    def ended(self, record: Any) -> None:
        if record.started is None:
            return  # refused: counted by refused()
        duration = max(0.0, (record.ended or record.started) - record.started)
        index = bisect.bisect_left(DURATION_BUCKETS, duration)
        received, sent = record.bytes_received, record.bytes_sent
        with self._lock:
            counts = self._counts
            counts["requests_finished"] += 1
            if record.outcome == "error":
                counts["requests_failed"] += 1
            if received:
                counts["bytes_received"] += received
            if sent:
                counts["bytes_sent"] += sent
            self._buckets[index] += 1
            self._duration_sum += duration

    # -- reading ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The counts and gauges now, as a JSON-able dict."""
        with self._lock:
            snapshot: dict[str, Any] = dict(self._counts)
            snapshot["refused"] = dict(self._refused)
            snapshot["buckets"] = list(self._buckets)
            snapshot["duration_sum"] = self._duration_sum
        snapshot["gauges"] = server_gauges(self.server) if self.server is not None else {}
        return snapshot


def server_gauges(server: Any) -> dict[str, int]:
    """The state of *server* now, from its read-only gauges: requests in
    flight, pool threads (threading), children (forking)."""
    gauges: dict[str, int] = {"active": server.requests_in_flight}
    pool_threads = getattr(server, "pool_threads", None)
    if pool_threads is not None:
        busy, idle, waiting = pool_threads()
        gauges.update(threads_busy=busy, threads_idle=idle, requests_waiting=waiting)
    if hasattr(server, "max_children"):  # ForkingMixIn
        gauges["children"] = len(server.active_children or ())
        gauges["active"] += gauges["children"]
    return gauges


def merge(snapshots: list[dict[str, Any]], *, gauges: bool = True) -> dict[str, Any]:
    """The sum of several snapshots of one server (several workers' copies).

    With *gauges* false the gauges are left out: the snapshots of workers
    that have exited count for their counters only.
    """
    total: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    total["refused"] = {}
    total["buckets"] = [0] * (len(DURATION_BUCKETS) + 1)
    total["duration_sum"] = 0.0
    total["gauges"] = {}
    for snapshot in snapshots:
        for name in COUNTERS:
            total[name] += snapshot.get(name, 0)
        for reason, count in snapshot.get("refused", {}).items():
            total["refused"][reason] = total["refused"].get(reason, 0) + count
        for index, count in enumerate(snapshot.get("buckets", ())[: len(total["buckets"])]):
            total["buckets"][index] += count
        total["duration_sum"] += snapshot.get("duration_sum", 0.0)
        if gauges:
            for name, value in snapshot.get("gauges", {}).items():
                total["gauges"][name] = total["gauges"].get(name, 0) + value
    return total
