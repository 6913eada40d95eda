# -*- test-case-name: tests.test_observability -*-
"""What ``--metrics``, ``--access-log``, ``--log-format`` and ``--drain-delay`` turn into.

One :class:`Observability` per process (``python -m txsocketserver``,
``twistd socketserver``, and with ``--workers`` the supervisor), made from the
parsed options: it checks them (each bad value is one ``UsageError`` line,
before anything serves), attaches the observers to the servers, listens on
the ``--metrics`` endpoint and starts the log observers.  A worker process
makes its own from the fields of its spec (:func:`worker_fields`).
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage

from txsocketserver._observability.access_log import (
    FORMATS,
    AccessLog,
    file_observer,
    format_json,
    is_access,
    open_access_log,
)
from txsocketserver._observability.health import Health

_log = Logger(namespace="txsocketserver")

#: The options' rows, added to the shared ``Options.optParameters``.
OPTION_PARAMETERS = [
    [
        "metrics",
        None,
        None,
        "Serve GET /metrics (Prometheus text), /livez and /readyz on this Twisted "
        "server endpoint, e.g. tcp:9100:interface=127.0.0.1 or unix:/run/app-metrics.sock; "
        "with --workers, one scrape of the supervisor sums every worker. Needs the "
        "txsocketserver[metrics] extra.",
    ],
    [
        "access-log",
        None,
        None,
        "Write one access record per connection (per datagram for datagram servers) "
        "to this file, appended ('-': standard output).",
    ],
    [
        "log-format",
        None,
        "text",
        f"Format of the access log and of the server's own log: {' or '.join(FORMATS)} "
        "(one JSON object per line).",
    ],
    [
        "drain-delay",
        None,
        0.0,
        "Seconds a stop keeps accepting and serving after /readyz turned 503, so that "
        "load balancers and Kubernetes stop sending first; then the server stops "
        "listening and drains (--drain-timeout). A second SIGTERM/SIGINT stops at once.",
        float,
    ],
]


def check_options(options: Any) -> None:
    """Check the observability options (``UsageError``, one line each)."""
    if options["log-format"] not in FORMATS:
        raise usage.UsageError(
            f"--log-format {options['log-format']!r}: choose one of {', '.join(FORMATS)}"
        )
    if options["drain-delay"] < 0:
        raise usage.UsageError("--drain-delay must not be negative")
    if options["metrics"] is not None:
        from txsocketserver._observability.exposition import require_prometheus

        try:
            require_prometheus()
        except ImportError as exc:
            raise usage.UsageError(f"--metrics: {exc}") from None
    path = options["access-log"]
    if path is not None and path != "-":
        try:
            open_access_log(path).close()
        except OSError as exc:
            raise usage.UsageError(
                f"--access-log {path!r}: cannot write: {exc.strerror or exc}"
            ) from None


class Observability:
    """The observers, the ``--metrics`` endpoint and the log of one process.

    Args:
        metrics: the ``--metrics`` endpoint description, or ``None``.
        access_log: the ``--access-log`` path (``-``: stdout), or ``None``.
        log_format: ``"text"`` or ``"json"``.
        health: the process's :class:`Health` (default: a new one).
    """

    def __init__(
        self,
        *,
        metrics: str | None = None,
        access_log: str | None = None,
        log_format: str = "text",
        health: Health | None = None,
    ) -> None:
        self.health = health if health is not None else Health()
        self.metrics_endpoint = metrics
        self.access_log_path = access_log
        self.log_format = log_format
        self.metrics: Any = None
        if metrics is not None:
            from txsocketserver._observability.metrics import Metrics

            self.metrics = Metrics(health=self.health)
        self._access_stream: IO[str] | None = None
        self._port: Any = None

    @classmethod
    def from_options(cls, options: Any, health: Health | None = None) -> Observability:
        return cls(
            metrics=options["metrics"],
            access_log=options["access-log"],
            log_format=options["log-format"],
            health=health,
        )

    def observe(self, server: Any, name: str) -> None:
        """Count *server*'s requests (``--metrics``) and log them (``--access-log``)."""
        from txsocketserver._observability.metrics import attach

        if self.metrics is not None:
            self.metrics.observe(server, name)
        else:
            from txsocketserver._observability.metrics import listening

            self.health.add_check(lambda: listening(server))
        if self.access_log_path is not None:
            attach(server, AccessLog(name))

    def announce(self, line: str) -> None:
        """Write one of ``python -m txsocketserver``'s own lines to stderr in
        ``log_format`` (signal-safe: no log observer, no lock)."""
        if self.log_format == "json":
            line = format_json(
                {"log_namespace": "txsocketserver", "log_format": "{line}", "line": line}
            )
        else:
            line += "\n"
        sys.stderr.write(line)
        sys.stderr.flush()

    def observe_workers(self, workers: Any) -> None:
        """Expose the sum over *workers*' workers (``--workers``), and make
        readiness need a serving worker."""
        if self.metrics is not None:
            self.metrics.observe_workers(workers)
        else:
            self.health.add_check(lambda: bool(workers.pids))

    def log_observers(self, stream: IO[str] | None = None) -> list[Any]:
        """The log observers of this process: first the server's own log on
        *stream* (stderr) in ``log_format``, without the access records when
        these go elsewhere; then, with ``--access-log``, the access log's."""
        server_log = sys.stderr if stream is None else stream
        if self.access_log_path is None:
            return [file_observer(server_log, self.log_format)]
        return [
            file_observer(server_log, self.log_format, accept=lambda e: not is_access(e)),
            *self.access_observers(),
        ]

    def access_observers(self) -> list[Any]:
        """Only the ``--access-log`` file's observer (``twistd`` keeps its own log)."""
        if self.access_log_path is None:
            return []
        self._access_stream = open_access_log(self.access_log_path)
        return [file_observer(self._access_stream, self.log_format, accept=is_access)]

    def listen_now(self, reactor: Any = None) -> None:
        """Listen on the ``--metrics`` endpoint, before the reactor runs (or
        on its thread); ``UsageError`` if it cannot."""
        if self.metrics is None or self.metrics_endpoint is None:
            return
        failures: list[Any] = []
        try:
            listening = self.metrics.listen(self.metrics_endpoint, reactor)
        except (ValueError, KeyError, TypeError) as exc:
            raise usage.UsageError(f"--metrics {self.metrics_endpoint!r}: {exc}") from None
        ports: list[Any] = []
        listening.addCallbacks(ports.append, failures.append)
        if failures:
            error = failures[0].value
            raise usage.UsageError(f"--metrics {self.metrics_endpoint!r}: cannot listen: {error}")
        if not ports:
            raise usage.UsageError(
                f"--metrics {self.metrics_endpoint!r}: this endpoint does not listen at once; "
                "use tcp:, tcp6: or unix:"
            )
        self._port = ports[0]
        _log.info(
            "serving /metrics, /livez and /readyz on {description} at {address}",
            description=self.metrics_endpoint,
            address=_where(self._port.getHost()),
        )

    def listen_blocking(self) -> None:
        """:meth:`listen_now` from a blocking program (on the reactor thread)."""
        from txsocketserver._twisted.reactor import call_in_reactor

        if self.metrics is not None:
            call_in_reactor(self.listen_now)

    @property
    def metrics_address(self) -> Any:
        """The address the ``--metrics`` endpoint listens on, once it does."""
        return None if self._port is None else self._port.getHost()

    def close(self) -> None:
        """Stop listening on the ``--metrics`` endpoint (reactor thread)."""
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()


def worker_fields(options: Any) -> dict[str, Any]:
    """The worker spec's observability fields (see :class:`Workers`)."""
    return {
        "metrics": options["metrics"] is not None,
        "access_log": options["access-log"],
        "log_format": options["log-format"],
    }


def observed_service(
    options: Any, service: Any, *, server: Any = None, workers: Any = None
) -> Any:
    """``twistd socketserver``'s service: *service* with the observability
    options applied (the ``--metrics`` endpoint listening already).

    Exits with the one-line message (as ``twistd``'s usage errors do) when
    the ``--metrics`` endpoint cannot listen.
    """
    if workers is not None:
        observability = Observability.from_options(options, health=workers.health)
        observability.observe_workers(workers)
    else:
        observability = Observability.from_options(options, health=service.health)
        observability.observe(server, options["listen"])
        service.drain_delay = options["drain-delay"]
    try:
        observability.listen_now()
    except usage.UsageError as error:
        raise SystemExit(f"twistd socketserver: {error}") from None
    return _ObservedService(service, observability)


class _ObservedService(MultiService):
    """The served service and what observes it: the access-log observers
    while it runs, the ``--metrics`` endpoint until it has stopped (so that
    ``/readyz`` answers 503 through the whole stop)."""

    def __init__(self, service: Any, observability: Observability) -> None:
        super().__init__()
        self.observability = observability
        self._observers = observability.access_observers()
        service.setServiceParent(self)

    def startService(self) -> None:
        for observer in self._observers:
            globalLogPublisher.addObserver(observer)
        super().startService()

    def stopService(self) -> Any:
        self.observability.health.begin_stop()

        def stopped(result: object) -> object:
            self.observability.close()
            for observer in self._observers:
                globalLogPublisher.removeObserver(observer)
            return result

        return super().stopService().addBoth(stopped)


def _where(address: Any) -> str:
    """``host:port`` of a Twisted address (``[v6]:port``), or a Unix path."""
    host = getattr(address, "host", None)
    if host is None:
        name = getattr(address, "name", None)
        return name.decode() if isinstance(name, bytes) else str(name)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
