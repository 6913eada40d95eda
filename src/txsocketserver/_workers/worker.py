# -*- test-case-name: tests.test_workers -*-
"""A worker process: serve the handler on the listening sockets the supervisor handed over.

Started by the supervisor (:mod:`txsocketserver._workers.supervisor`) with
``reactor.spawnProcess`` as ``python -m txsocketserver._workers.worker SPEC``,
a fresh interpreter, so a reload imports the handler's code anew.  What it
receives:

* ``SPEC``, a JSON object (see :class:`~txsocketserver._workers.supervisor.Workers`
  for what each field means): the handler, server class, mode and limits, and
  one entry per listener.
* The shared listening sockets as fds 3, 4, ... with ``LISTEN_FDS`` and
  ``LISTEN_FDNAMES`` set, as systemd hands sockets to a service
  (``spawnProcess`` cannot run code between fork and exec, so the worker sets
  ``LISTEN_PID`` to its own pid itself, first thing).  A plain or TLS listener
  is adopted as a Python socket and served on the socket path (handlers get
  real sockets); a PROXY-protocol listener is served through Twisted as
  ``haproxy:systemd:...``, the endpoint adopting the fd
  (``adoptStreamPort``).  With ``--reuse-port`` the worker binds its own
  ``SO_REUSEPORT`` socket instead.
* The *control pipe*, the fd after the listeners, on which it writes one line
  per event: ``ready`` once every server serves (its serving loop has gone
  round once: it listens and answers), ``beat`` every ``heartbeat`` seconds
  while every serving loop made progress within ``worker_timeout`` (else
  ``stuck SECONDS``, once, after logging the stacks of all its threads),
  ``retire`` when ``max_requests`` is reached (it then drains and exits by
  itself).
* The *supervisor pipe*, the fd after that, which the worker only reads: end
  of file means the supervisor is gone (killed, say), and the worker then
  drains and exits instead of serving on unsupervised.

It runs the reactor in its main thread and each server as a
``ServerService``; SIGTERM (from the supervisor) stops the reactor, whose
shutdown drains every server (``drain_timeout``), and the worker exits 0.
SIGHUP, SIGTTIN and SIGTTOU are the supervisor's: a worker ignores them (a
terminal sends them to the whole process group).  SIGUSR1 reopens the log
files (``--log-file``, see :mod:`txsocketserver._logfiles`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from typing import Any

#: First fd of the listening sockets, as systemd numbers them.
FIRST_LISTEN_FD = 3
#: Seconds between two snapshots of a worker's counts (--metrics) to the supervisor.
METRICS_INTERVAL = 1.0

# A worker's exit statuses, which the supervisor reads (gunicorn's numbers).
#: It stopped as asked: SIGTERM, ``max_requests`` reached, its supervisor gone.
WORKER_STOPPED = 0
#: It never served: the handler or server class cannot be imported (a reload
#: with broken code), or a listening socket cannot be served.  The output says why.
WORKER_BOOT_ERROR = 3
#: What the supervisor's log says of a status beside its number.
EXIT_MEANINGS = {WORKER_BOOT_ERROR: "boot error"}


def main(argv: list[str] | None = None) -> None:
    """Run one worker until SIGTERM; exits the process."""
    spec = json.loads((sys.argv if argv is None else argv)[1])
    # Before Twisted is imported: its systemd endpoint parser reads the
    # environment once, when twisted.internet.endpoints is first imported.
    os.environ["LISTEN_PID"] = str(os.getpid())
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    from txsocketserver import _logfiles

    if spec.get("log_file"):
        _logfiles.log_to_file(spec["log_file"])
    _logfiles.handle_sigusr1()
    import faulthandler

    # A worker the supervisor finds stuck gets SIGABRT first: the tracebacks
    # of its threads then say where it was stuck.
    faulthandler.enable(all_threads=True)
    for entry in reversed(spec["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    import twisted.internet.endpoints  # noqa: F401 - reads LISTEN_FDS (see above)

    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python.usage import UsageError

    observing = spec.get("observability") or {}
    if observing:
        from txsocketserver._observability.cli import Observability

        observers = Observability(
            access_log=observing.get("access_log"), log_format=observing["log_format"]
        ).log_observers()
    else:
        observers = [textFileLogObserver(sys.stderr)]
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    try:
        worker = _Worker(spec, reactor)
    except UsageError as error:
        # The handler or server class cannot be imported (a reload with
        # broken code): say why; the supervisor retries after a back-off.
        print(f"worker {os.getpid()}: cannot start: {error}", file=sys.stderr, flush=True)
        os._exit(WORKER_BOOT_ERROR)
    reactor.callWhenRunning(worker.start)
    reactor.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(worker.exit_status)


def thread_stacks() -> str:
    """The stack of every thread of this process, innermost call last, named."""
    import threading
    import traceback

    names = {thread.ident: thread.name for thread in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"Thread {names.get(ident, '?')} ({ident}):\n{stack}")
    return "\n".join(parts)


def _adopt(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    # Several processes wait on this socket: each gets woken, one wins the
    # connection, and the others' accept() must fail (and the loop go on)
    # instead of blocking.  Accepted sockets are blocking still.
    sock.setblocking(False)
    return sock


def _bind_reuse_port(bind: dict[str, Any]) -> socket.socket:
    sock = socket.socket(bind["family"], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(tuple(bind["address"]))
        sock.listen(bind["backlog"])
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Worker:
    """The servers of one worker process, and its side of the control pipe."""

    def __init__(self, spec: dict[str, Any], reactor: Any) -> None:
        from txsocketserver._server_classes import load_object, mode_for, server_class

        self._spec = spec
        self._reactor = reactor
        self._control = spec["control_fd"]
        self.exit_status = WORKER_STOPPED
        self._services: list[Any] = []
        self._servers: list[Any] = []
        self._ticks: dict[int, float] = {}
        self._requests = 0
        self._retiring = False
        self._observing = spec.get("observability") or {}
        self._stats: list[Any] = []  # each server's ServerStats (--metrics)
        self._stuck = False
        self._handler = load_object(spec["handler"], "--handler")
        self._server_class = server_class(spec["server"], mode_for(self._handler, spec["mode"]))

    def start(self) -> None:
        from twisted.internet.defer import gatherResults

        from txsocketserver._twisted.service import start_server

        self._reactor.addSystemEventTrigger("before", "shutdown", self._stop)
        self._watch_supervisor = _SupervisorWatch(self._control + 1, self._reactor)
        self._reactor.addReader(self._watch_supervisor)
        try:
            for index, listener in enumerate(self._spec["listeners"]):
                self._servers.append(self._make_server(index, listener))
        except BaseException as exc:
            print(f"worker {os.getpid()}: cannot serve: {exc!r}", file=sys.stderr, flush=True)
            for server in self._servers:
                server.server_close()
            self._servers = []
            self.exit_status = WORKER_BOOT_ERROR
            self._reactor.stop()
            return
        started = [
            start_server(
                server, drain_timeout=self._spec["drain_timeout"], poll_interval=self._poll
            )
            for server in self._servers
        ]

        def serving(services: list[Any]) -> None:
            self._services = services
            since = time.monotonic()

            # Ready once every serving loop has gone round (service_actions
            # ran after its first wait on the socket): it takes connections.
            def answering() -> None:
                if all(tick > since for tick in self._ticks.values()):
                    self._serving()
                else:
                    self._reactor.callLater(0.01, answering)

            answering()

        def failed(failure: Any) -> None:
            self.exit_status = WORKER_BOOT_ERROR
            self._reactor.stop()

        gatherResults(started, consumeErrors=True).addCallbacks(serving, failed)

    def _serving(self) -> None:
        self._send(b"ready")
        if self._stats:
            from twisted.internet.task import LoopingCall

            LoopingCall(self._send_metrics).start(METRICS_INTERVAL)
        if self._spec["heartbeat"]:
            from twisted.internet.task import LoopingCall

            LoopingCall(self._beat).start(self._spec["heartbeat"])

    @property
    def _poll(self) -> float:
        # service_actions() runs once per poll interval at least: the heartbeat
        # needs it to run well within the worker timeout.
        timeout = self._spec["worker_timeout"]
        return 0.5 if not timeout else min(0.5, timeout / 4)

    def _make_server(self, index: int, listener: dict[str, Any]) -> Any:
        from txsocketserver._twisted.endpoints import Endpoint

        if listener["proxy"] is not None:
            description = f"{listener['proxy']}systemd:domain={listener['domain']}:index={index}"
            endpoint = Endpoint(description)
            if listener["tls"] is not None:
                # haproxy:ssl:: the header in clear, then TLS (bound_sockets).
                endpoint.begin_tls_after_proxy(listener["tls"])
            server = self._server_class(endpoint, self._handler, False)
        else:
            if listener["bind"] is not None:
                sock = _bind_reuse_port(listener["bind"])
            else:
                sock = _adopt(FIRST_LISTEN_FD + index)
            try:
                if listener["tls"] is not None:
                    address: Any = Endpoint(listener["tls"])
                else:
                    address = sock.getsockname()
                server = self._server_class(address, self._handler, False)
            except BaseException:
                sock.close()
                raise
            server.socket.close()
            server.socket = sock
            server.address_family = sock.family
            server.server_address = sock.getsockname()
            if listener["bind"] is None:
                # Shared with the other workers: one wakes per connection,
                # in turn (Linux; elsewhere the first to wake takes it).
                from txsocketserver._workers.exclusive_accept import share_evenly

                share_evenly(server, self._reactor)
        if self._spec["max_threads"] is not None:
            server.max_threads = self._spec["max_threads"]
        if self._spec["trusted_proxies"] is not None:
            server.trusted_proxies = tuple(self._spec["trusted_proxies"])
        if self._spec["header_timeout"] is not None:
            server.header_timeout = self._spec["header_timeout"]
        for attribute, value in listener.get("settings", {}).items():
            # A [[listener]] table's own options (txsocketserver._config.PER_LISTENER).
            setattr(server, attribute, tuple(value) if isinstance(value, list) else value)
        self._watch(server)
        self._observe(server, listener["description"])
        return server

    def _observe(self, server: Any, label: str) -> None:
        from txsocketserver._observability.metrics import attach

        if self._observing.get("metrics"):
            from txsocketserver._observability.stats import ServerStats

            stats = ServerStats(label, server)
            attach(server, stats)
            self._stats.append(stats)
        if self._observing.get("access_log"):
            from txsocketserver._observability.access_log import AccessLog

            attach(server, AccessLog(label))

    def _send_final_metrics(self, result: Any) -> Any:
        self._send_metrics()
        return result

    def _send_metrics(self) -> None:
        snapshot = {stats.name: stats.snapshot() for stats in self._stats}
        self._send(b"metrics " + json.dumps(snapshot, separators=(",", ":")).encode())

    def _watch(self, server: Any) -> None:
        """Note each serving loop's progress, and count requests.

        Wrapped on the instance rather than in a subclass: the server class is
        the user's, and a forking server's class must stay importable by name.
        """
        key = id(server)
        self._ticks[key] = time.monotonic()
        service_actions = server.service_actions

        def ticking_service_actions() -> None:
            self._ticks[key] = time.monotonic()
            service_actions()

        server.service_actions = ticking_service_actions
        verify_request = server.verify_request

        def counting_verify_request(request: Any, client_address: Any) -> bool:
            # The loop takes a request: progress, up to this moment (a request
            # that then runs for worker_timeout is a stall of that long).
            self._ticks[key] = time.monotonic()
            self._requests += 1
            if self._requests == self._spec["max_requests"]:
                # From the serving thread, shutdown() returns at once and the
                # loop takes no request after this one; the drain follows.
                server.shutdown()
                self._reactor.callFromThread(self._retire)
            return verify_request(request, client_address)

        server.verify_request = counting_verify_request

    def _beat(self) -> None:
        # A serving loop stuck in a handler (a synchronous server), or a loop
        # that died, for worker_timeout: say so once, with every thread's
        # stack, and the supervisor replaces the worker.  The beat itself
        # tells it that this reactor turns.
        if self._stuck:
            return
        stalled = time.monotonic() - min(self._ticks.values())
        if stalled < self._spec["worker_timeout"]:
            self._send(b"beat")
            return
        self._stuck = True
        from twisted.logger import Logger

        Logger(namespace="txsocketserver.workers").error(
            "worker {pid}: a serving loop made no progress for {seconds:.2f}s "
            "(--worker-timeout {timeout}); the stacks of its threads:\n{stacks}",
            pid=os.getpid(),
            seconds=stalled,
            timeout=self._spec["worker_timeout"],
            stacks=thread_stacks(),
        )
        self._send(b"stuck %.2f" % stalled)

    def _retire(self) -> None:
        if self._retiring:
            return
        self._retiring = True
        self._send(b"retire")
        self._reactor.stop()

    def _send(self, line: bytes) -> None:
        try:
            os.write(self._control, line + b"\n")
        except OSError:
            pass  # the supervisor is gone; SIGTERM or our own exit follows

    def _stop(self) -> Any:
        from twisted.internet.defer import DeferredList

        self._watch_supervisor.stopping = True
        stopped = DeferredList([service.stopService() for service in self._services])
        if self._stats:
            # The counts of the drained requests too, before the worker exits.
            stopped.addBoth(self._send_final_metrics)
        return stopped


class _SupervisorWatch:
    """Reads the supervisor pipe (reactor thread): its end stops the worker."""

    def __init__(self, fd: int, reactor: Any) -> None:
        self._fd = fd
        self._reactor = reactor
        # Set once the reactor shuts down, which disconnects every reader.
        self.stopping = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        try:
            data = os.read(self._fd, 512)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data:
            return None
        from twisted.internet import main

        return main.CONNECTION_DONE  # the reactor calls connectionLost

    def connectionLost(self, reason: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        print(f"worker {os.getpid()}: the supervisor is gone; stopping", file=sys.stderr)
        self._reactor.stop()


if __name__ == "__main__":
    main()
