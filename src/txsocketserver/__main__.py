# -*- test-case-name: tests.test_twistd_cli,tests.test_async_cli -*-
"""``python -m txsocketserver``: serve a handler class without ``twistd``.

    python -m txsocketserver --listen tcp:8000 --handler http.server:SimpleHTTPRequestHandler

The options are those of ``twistd socketserver`` (``--help`` lists them), plus
``--log-level``.  The server runs ``serve_forever()`` in the main thread, in
the blocking world; log events (``twisted.logger``: handler errors, access
lines of ``http.server`` handlers, refused connections) are written to stderr.

SIGTERM or Ctrl-C stops it gracefully (stop accepting, drain the requests in
flight for up to ``--drain-timeout`` seconds, cut off the stragglers' connections,
close): the process exits within the drain timeout plus a short grace
(:data:`~txsocketserver._twisted.service.STRAGGLER_GRACE`), whatever its handlers do.
A second signal stops it at once: the connections in flight are cut and the
process exits.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage

import txsocketserver
from txsocketserver._cli import (
    Options,
    build_server,
    build_workers,
    describe,
    describe_workers,
    start_log_file,
)
from txsocketserver._observability.cli import Observability
from txsocketserver._twisted.service import (
    STRAGGLER_GRACE,
    abort_requests,
    log_errors,
    stop_gracefully,
)
from txsocketserver._twisted.tls import reload_certificates_on_sighup

PROG = "python -m txsocketserver"
# Exit statuses, as Python's own command line and argparse give them.
#: Stopped gracefully.
EXIT_OK = 0
#: The options are wrong (argparse's status); the message says which.
EXIT_USAGE = 2
#: A second SIGTERM or SIGINT stopped it at once (128 + SIGINT, as a shell reports Ctrl-C).
EXIT_STOPPED_AT_ONCE = 128 + int(signal.SIGINT)
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
# Beyond the drain and the stragglers' grace: what closing the server may take.
_CLOSE_MARGIN = 1.0


class MainOptions(Options):
    """The shared options, plus what only this front end has (``twistd`` has
    its own logging options and ``-r`` for the reactor)."""

    # Twisted's default usage line names the interpreter's file name.
    synopsis = f"Usage: {PROG} {Options.synopsis}"
    other_front_end_options = ()  # twistd's own options are not configuration
    optParameters = [
        *Options.optParameters,
        [
            "log-level",
            None,
            "info",
            f"Least severe log events written to stderr: {', '.join(LOG_LEVELS)} "
            "(debug shows health checks and connections that sent nothing).",
        ],
    ]

    def postOptions(self) -> None:
        if self["log-level"] not in LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level {self['log-level']!r}: choose one of {', '.join(LOG_LEVELS)}"
            )
        super().postOptions()

    def opt_reactor(self, name: str) -> None:
        """Twisted reactor to run, e.g. asyncio (so async handlers can await asyncio
        code), epoll, poll, select."""
        from twisted.application.reactors import NoSuchReactor, installReactor

        try:
            installReactor(name)
        except NoSuchReactor:
            raise usage.UsageError(f"--reactor {name!r}: no such reactor") from None
        except Exception as exc:
            raise usage.UsageError(f"--reactor {name!r}: {exc}") from exc
        self["reactor"] = name  # for --print-config


class _StopNow(BaseException):
    """Raised in the main thread by a second stop signal."""


def _begin_logging(level: str, observability: Observability | None = None) -> None:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observers: list[Any]
    if observability is None:
        observers = [textFileLogObserver(sys.stderr)]
    else:
        observers = observability.log_observers()
    # The level filters the server's own log; the access log has every record.
    observers[0] = FilteringLogObserver(observers[0], [predicate])
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, serve until SIGTERM/SIGINT, return the exit status."""
    options = MainOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
        if options["workers"] is not None:
            workers = build_workers(options)
        else:
            server = build_server(options)
        start_log_file(options)
    except usage.UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        print(f"{PROG}: try --help", file=sys.stderr)
        return EXIT_USAGE
    observability = _observe(options, workers if options["workers"] is not None else server)
    if observability is None:
        return EXIT_USAGE
    _begin_logging(options["log-level"], observability)
    if options["workers"] is not None:
        from txsocketserver._workers.supervisor import run_workers

        description = describe_workers(options, workers)
        return run_workers(workers, describe=description, begin_logging=False)
    log_errors(server)
    if isinstance(server, txsocketserver.ThreadingMixIn):
        # The drain, not interpreter exit, decides how long requests may run:
        # a handler still running after it must not hold the process.
        server.daemon_threads = True

    serving = threading.current_thread()
    say = observability.announce
    drain_timeout = options["drain-timeout"]
    # The drain waits for serve_forever, which runs in this very thread: it
    # has to happen in another one.  A daemon, so that a second signal can
    # end the process under it.
    drain_delay = options["drain-delay"]

    def stop_in_phases() -> None:
        # Phase 1 (--drain-delay): serving on, /readyz 503 (and systemd told)
        # since the signal.
        if drain_delay > 0:
            time.sleep(drain_delay)
        stop_gracefully(server, drain_timeout=drain_timeout, serving=serving)

    stopper = threading.Thread(target=stop_in_phases, name="txsocketserver-stop", daemon=True)
    stopping: list[threading.Thread] = []

    def stop(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stopping:
            say(f"{PROG}: {name} again: stopping now")
            raise _StopNow
        # Recorded first: a second signal may interrupt the lines below.
        stopping.append(stopper)
        observability.health.begin_stop()
        say(f"{PROG}: {name}: stopping")
        stopper.start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reload_certificates_on_sighup(server)
    if options["log-file"] is not None:
        from txsocketserver import _logfiles

        _logfiles.handle_sigusr1()
    say(f"{PROG}: {describe(options, server)}")
    # The server listens: tell systemd (READY=1, then STATUS= and WATCHDOG=1).
    from txsocketserver._twisted import reactor as _reactor
    from txsocketserver._twisted import systemd

    if systemd.notifier().enabled:
        _reactor.call_in_reactor(systemd.ServerNotifications(server).start)
    try:
        try:
            server.serve_forever()
        except OSError:
            # serve_forever fails once the stopper closed the server under a
            # loop that did not leave in time: the stop itself reports on that.
            if not stopping:
                raise
        if not stopping:
            server.server_close()
            return EXIT_OK
        stopping[0].join(drain_delay + drain_timeout + STRAGGLER_GRACE + _CLOSE_MARGIN)
        if stopping[0].is_alive():
            say(f"{PROG}: handlers still running; exiting")
        return EXIT_OK
    except (_StopNow, KeyboardInterrupt):
        server.block_on_close = False
        abort_requests(server)
        return EXIT_STOPPED_AT_ONCE


def _observe(options: MainOptions, served: Any) -> Observability | None:
    """Apply --metrics, --access-log and --log-format to *served* (the server,
    or the --workers supervisor): None, after printing why, if the --metrics
    endpoint cannot listen (the server is then closed)."""
    workers = options["workers"] is not None
    observability = Observability.from_options(options, health=served.health if workers else None)
    try:
        if workers:
            observability.observe_workers(served)
            observability.listen_now()  # before the reactor runs, in this thread
        else:
            observability.observe(served, options["listen"])
            observability.listen_blocking()
    except usage.UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        if workers:
            for listener in served.listeners:
                listener.close()
        else:
            served.server_close()
        return None
    return observability


if __name__ == "__main__":
    sys.exit(main())
