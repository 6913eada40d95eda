# -*- test-case-name: tests.test_workers -*-
"""The supervisor: N worker processes serving the same listening sockets.

Theory of operation
===================

The supervisor runs no user code.  It binds the listening sockets
(``bound_sockets``), then keeps ``workers`` worker processes serving them, each
started with ``reactor.spawnProcess`` (a fresh interpreter running
``worker``), the sockets passed as fds 3, 4, ... (``childFDs``) and a
*control pipe* after them, on which the worker reports ``ready``, ``beat``
and ``retire``, and a pipe the other way that the supervisor never writes:
a worker seeing its end of file knows the supervisor died.

Every event (a worker ready, exited, retiring, timed out; a signal) ends in
:meth:`Workers._reconcile`, which compares what runs with what is wanted:

* Workers belong to a *generation*; a reload (SIGHUP) starts a new one.
  While fewer than ``workers`` workers of the current generation run (not
  stopping), new ones are started, after a back-off if workers have been
  dying before they got ready (0.25 s, doubling, at most 16 s; reset once a
  worker gets ready or on reload).
* Workers of older generations are told to stop (SIGTERM: they drain their
  requests in flight within ``drain_timeout`` and exit) one for each worker
  of the current generation that gets ready beyond ``workers``: a reload is
  rolling, an old worker drains only once a new one serves.  So are extra
  workers after SIGTTOU, those that are not ready yet first, then the
  oldest.
* A worker over ``max_worker_memory`` or past its ``max_worker_lifetime``
  is *retiring*: it serves on, but no longer counts, so a replacement
  starts; once that one is ready, the retiring worker drains like an old
  generation's.

So a reload or a recycled worker never leaves the sockets without a serving
process, and nothing is ever refused: the sockets stay open in the supervisor
throughout.

``worker_timeout`` (S) is judged where the facts are.  A worker whose
reactor turns checks its own serving loops every ``beat_interval(S)``
seconds; one that has not turned for S seconds makes the worker log the
stacks of all its threads and report ``stuck``, and the supervisor kills
it.  Otherwise it reports ``beat``; a worker from which nothing arrives for
S plus one beat interval has a stuck reactor: the supervisor sends SIGABRT
(``faulthandler`` writes its threads' stacks to its stderr, then it dies)
and, if it still lives ``KILL_GRACE`` later, SIGKILL.  Either way a stall of
S seconds is acted on within one beat interval (at most 0.25 s) of its S-th
second, and a worker whose loops and reactor turned within the last S
seconds is never killed.  The replacement starts at once, as for a worker
that exits for any other reason.

Stopping (:meth:`Workers.stopService`, SIGTERM/SIGINT) refuses new
connections in every process at once (``BoundSocket.stop_listening``), sends
SIGTERM to every worker, and kills those still running ``drain_timeout``
plus a grace period later.  Everything here runs on the reactor thread.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txsocketserver._observability.exposition import RESTART_CAUSES
from txsocketserver._observability.health import Health
from txsocketserver._observability.stats import merge
from txsocketserver._twisted import systemd
from txsocketserver._twisted.service import DEFAULT_DRAIN_TIMEOUT
from txsocketserver._workers.bound_sockets import BoundSocket, bind_socket
from txsocketserver._workers.worker import EXIT_MEANINGS, FIRST_LISTEN_FD

_log = Logger(namespace="txsocketserver.workers")

#: Back-off before starting again after a worker died before it got ready.
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 16.0
#: Seconds a worker may take to get ready (import the handler, listen).
START_TIMEOUT = 60.0
#: Seconds between SIGABRT and SIGKILL for a stuck worker, and added to the
#: drain timeout before the supervisor kills workers that do not stop.
KILL_GRACE = 3.0
#: Seconds between looks at memory and lifetimes.
CHECK_INTERVAL = 0.5


def beat_interval(worker_timeout: float) -> float:
    """Seconds between a worker's looks at its own progress (and its reports).

    Also the margin of ``worker_timeout``: a stall is acted on at most this
    long after it has lasted ``worker_timeout`` seconds.
    """
    return min(0.25, worker_timeout / 10)


def resident_memory(pid: int) -> int | None:
    """Resident memory of process *pid* in bytes (Linux: ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def class_spec(obj: str | type) -> str:
    """``package.module:Name`` for a class (workers import it by that name)."""
    if isinstance(obj, str):
        return obj
    qualname = obj.__qualname__
    if "<locals>" in qualname or obj.__module__ == "__main__":
        raise TypeError(
            f"workers import {qualname} by name in new processes: define it at the top "
            "level of an importable module (not __main__) and pass that"
        )
    return f"{obj.__module__}:{qualname}"


class _WorkerProcess(ProcessProtocol):
    """One worker, as the supervisor sees it (reactor thread)."""

    def __init__(self, supervisor: Workers, generation: int, control_fd: int) -> None:
        self.supervisor = supervisor
        self.generation = generation
        self.control_fd = control_fd
        self.started = time.monotonic()
        self.last_beat = self.started
        self.ready = False
        self.ready_at: float | None = None
        self.stopping = False  # told to stop, retiring, or killed
        # Over --max-worker-memory or --max-worker-lifetime: replaced, then drained.
        self.retiring: str | None = None
        self.lifetime: float | None = None  # from ready, with its jitter
        self._silence: Any = None  # fires when the worker's reactor looks stuck
        self.ended = False
        self.pid: int | None = None
        self._buffer = b""
        self._deadline: Any = None  # the kill timer of a stopping worker
        # {server label: its stats snapshot}, the last the worker sent (--metrics).
        self.snapshot: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<worker {self.pid} generation {self.generation}>"

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.control_fd:
            return
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"metrics "):
                # Sent by the reactor on a timer: not a sign of progress.
                self.snapshot = json.loads(line[8:])
                continue
            self.last_beat = time.monotonic()
            self.supervisor._heard_from(self)
            if line == b"ready":
                self.ready = True
                self.ready_at = self.last_beat
                self.supervisor._worker_ready(self)
            elif line == b"retire":
                self.expect_exit()
                self.supervisor._worker_retiring(self)
            elif line.startswith(b"stuck"):
                self.supervisor._worker_stuck(self, line[len(b"stuck") :].strip().decode())

    def signal(self, signum: int) -> None:
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess(signum)
        except OSError:
            pass  # it has just exited: processEnded follows

    def terminate(self) -> None:
        """Ask the worker to drain and exit (SIGTERM)."""
        self.signal(signal.SIGTERM)
        self.expect_exit()

    def expect_exit(self) -> None:
        """The worker is on its way out: kill it if it is not gone in time."""
        if self.stopping:
            return
        self.stopping = True
        timeout = self.supervisor.drain_timeout + KILL_GRACE
        self._deadline = self.supervisor._reactor.callLater(timeout, self._overdue, timeout)

    def _overdue(self, timeout: float) -> None:
        if not self.ended:
            _log.warn("{worker} still running {t}s after it was stopped; killing it",
                      worker=self, t=timeout)  # fmt: skip
            self.signal(signal.SIGKILL)

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self.supervisor._worker_ended(self, reason.value)


class Workers(Service):
    """Serve a handler class with several worker processes sharing the listening sockets.

    A Twisted ``IService``: ``Workers(...).setServiceParent(application)`` in a
    ``.tac``, ``twistd socketserver --workers N``, or
    :func:`txsocketserver.run_workers` for a program of its own.  The sockets
    are bound in the constructor (before ``twistd`` drops privileges);
    ``startService`` starts the workers, ``stopService`` drains and stops them.

    Args:
        handler: the request handler class, or ``"package.module:Class"``.
            Workers import it by name, anew at each reload.
        listen: one or several ``--listen`` descriptions: ``tcp:``,
            ``tcp6:``, ``unix:``, ``ssl:``, ``systemd:``, or ``haproxy:`` in
            front of one of them (not ``ssl:``).
        workers: how many worker processes serve (at least 1).
        mode: ``"sync"``, ``"threading"`` or ``"forking"``, how each worker
            runs requests (as ``--mode``); ``None``: threading, or the
            *server* class as it is.
        server: a txsocketserver stream server class (or its name); default
            ``TCPServer`` with *mode*'s mix-in.
        max_threads: with threading, the cap on each worker's requests at once.
        drain_timeout: seconds a stopping worker lets its requests in flight
            finish (``stopService``, reload, recycling).
        reuse_port: each worker binds its own ``SO_REUSEPORT`` socket and the
            kernel spreads connections over them, instead of all workers
            accepting from one shared socket (see ``docs/operations.md``).
        max_requests: recycle a worker after about this many requests
            (0: never), plus a random 0..*max_requests_jitter* per worker, so
            that workers do not all restart at once.
        worker_timeout: replace a worker whose reactor or serving loop has
            not made progress for this many seconds (``None``: never); a
            synchronous worker running one request longer than this counts
            as stuck.  The stacks of its threads are logged first.
        max_worker_memory: replace a worker whose resident memory exceeds
            this many megabytes (10**6 bytes; Linux): it drains once its
            replacement is ready.
        max_worker_lifetime: replace a worker this many seconds after it got
            ready, plus a random 0..*max_worker_lifetime_jitter* (default: a
            tenth of the lifetime), the same way.
        listener_settings: per *listen* description, server attributes
            (``trusted_proxies``, ``header_timeout``, ``max_threads``) that
            its servers set for themselves (a ``[[listener]]`` table).
        log_file: the path of ``--log-file``, which the workers' output
            goes to too; SIGUSR1 makes the supervisor and every worker
            reopen it.
        trusted_proxies, header_timeout: set on each worker's servers, for
            ``haproxy:`` listeners (``None``: the server class's defaults).
        drain_delay: seconds ``stopService`` keeps the workers serving after
            the stop began (``health`` no longer ready), before they stop
            accepting and drain.
        observability: what each worker observes: ``{"metrics": bool,
            "access_log": path or None, "log_format": "text" or "json"}``;
            with ``metrics``, workers send their counts, which
            :meth:`metrics_snapshots` sums.
        handle_signals: in ``startService``, take SIGHUP (reload), SIGTTIN
            and SIGTTOU (one worker more, or fewer), SIGUSR1 (reopen the log
            files, the workers' too); main thread only.

    Under systemd (``NOTIFY_SOCKET`` set) the service sends ``READY=1`` (with
    ``MAINPID``) once its first workers are ready, ``RELOADING=1`` and then
    ``READY=1`` around a reload, ``STOPPING=1`` when it stops, a ``STATUS=``
    line with the workers' counts, and ``WATCHDOG=1`` while at least one
    worker serves (see ``docs/operations.md``).

    Error handling:
        ``ValueError`` for a description workers cannot serve or an unknown
        *mode*, ``OSError``
        if binding fails, ``TypeError`` for a class workers cannot import.
        A worker that cannot start (its import fails) is logged and started
        again after a back-off, the others serving meanwhile.
    """

    def __init__(
        self,
        handler: str | type,
        listen: str | Sequence[str],
        *,
        workers: int = 2,
        mode: str | None = None,
        server: str | type | None = None,
        max_threads: int | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        reuse_port: bool = False,
        max_requests: int = 0,
        max_requests_jitter: int = 0,
        worker_timeout: float | None = None,
        trusted_proxies: Sequence[str] | None = None,
        header_timeout: float | None = None,
        handle_signals: bool = True,
        drain_delay: float = 0.0,
        observability: dict[str, Any] | None = None,
        max_worker_memory: float | None = None,
        max_worker_lifetime: float | None = None,
        max_worker_lifetime_jitter: float | None = None,
        log_file: str | None = None,
        listener_settings: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        from txsocketserver._server_classes import MODES

        if workers < 1:
            raise ValueError("workers must be at least 1")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        self.handler = class_spec(handler)
        self.server = None if server is None else class_spec(server)
        self.mode = mode
        self.max_threads = max_threads
        self.workers = workers
        self.drain_timeout = drain_timeout
        self.max_requests = max_requests
        self.max_requests_jitter = max_requests_jitter
        self.worker_timeout = worker_timeout
        self.trusted_proxies = None if trusted_proxies is None else list(trusted_proxies)
        self.header_timeout = header_timeout
        self.handle_signals = handle_signals
        for name, value in (
            ("max_worker_memory", max_worker_memory),
            ("max_worker_lifetime", max_worker_lifetime),
        ):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive")
        if max_worker_lifetime_jitter is not None and max_worker_lifetime_jitter < 0:
            raise ValueError("max_worker_lifetime_jitter must not be negative")
        if max_worker_memory is not None and resident_memory(os.getpid()) is None:
            raise ValueError("max_worker_memory reads /proc/PID/statm, which this system lacks")
        self.max_worker_memory = max_worker_memory
        self.max_worker_lifetime = max_worker_lifetime
        if max_worker_lifetime_jitter is None and max_worker_lifetime is not None:
            max_worker_lifetime_jitter = max_worker_lifetime / 10
        self.max_worker_lifetime_jitter = max_worker_lifetime_jitter or 0.0
        self.log_file = log_file
        self._replaced = 0  # workers replaced (died, stuck, retired) since the start
        self._announced = False  # READY=1 sent for the current generation
        self._started_once = False  # READY=1 ever sent
        self._heartbeat = systemd.Heartbeat(self._health, self._status)
        descriptions = [listen] if isinstance(listen, str) else list(listen)
        if not descriptions:
            raise ValueError("workers need at least one listen description")
        self.listeners: list[BoundSocket] = []
        try:
            for description in descriptions:
                self.listeners.append(bind_socket(description, reuse_port=reuse_port))
        except BaseException:
            for listener in self.listeners:
                listener.close()
            raise
        settings = list(listener_settings or [])
        self._listener_settings = {
            id(listener): dict(settings[index]) if index < len(settings) else {}
            for index, listener in enumerate(self.listeners)
        }
        self._generation = 0
        self._processes: list[_WorkerProcess] = []
        self._failures = 0  # workers in a row that died before getting ready
        self._next_start = 0.0
        self._pending_start: Any = None
        self._checker: Any = None
        self._stopping: Deferred[None] | None = None
        self._old_signals: dict[int, Any] = {}
        self._devnull: int | None = None
        self._reactor: Any = None  # the running reactor, from startService
        self._ready_waiters: list[Deferred[None]] = []
        self.drain_delay = drain_delay
        self.observability = observability or {}
        #: The moment a stop begins, which ``stopService`` records first thing
        #: (``/readyz`` answers 503 from then on; see :class:`~txsocketserver.Health`).
        self.health = Health()
        #: Workers replaced so far, by cause (see RESTART_CAUSES).
        self.restarts = dict.fromkeys(RESTART_CAUSES, 0)
        # The counts of workers that have exited: {server label: snapshot}.
        self._exited_counts: dict[str, dict[str, Any]] = {}
        self._delayed_stop: Any = None

    # -- what operators and tests look at ------------------------------------------

    @property
    def addresses(self) -> list[Any]:
        """Each listener's bound address, in ``listen`` order."""
        return [listener.address for listener in self.listeners]

    @property
    def pids(self) -> set[int]:
        """Pids of the workers currently ready and not stopping."""
        return {p.pid for p in self._processes if p.ready and not p.stopping and p.pid is not None}

    def when_ready(self) -> Deferred[None]:
        """A Deferred firing once ``workers`` workers of the current
        generation are ready (at once if they are); it fails if the service
        stops first."""
        if self._stopping is not None:
            from twisted.internet.defer import fail

            return fail(RuntimeError("the workers were stopped"))
        if self._all_ready():
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def _all_ready(self) -> bool:
        ready = [p for p in self._processes if p.generation == self._generation and p.ready]
        return len(ready) >= self.workers and not any(p.stopping for p in ready)

    def _notify_ready(self) -> None:
        if self._stopping is None and not self._all_ready():
            return
        waiters, self._ready_waiters = self._ready_waiters, []
        for waiter in waiters:
            if self._stopping is None:
                waiter.callback(None)
            else:
                waiter.errback(RuntimeError("the workers were stopped before they were ready"))

    # -- the service -----------------------------------------------------------------

    def startService(self) -> None:
        if self._devnull is not None:
            raise RuntimeError("Workers run once; make a new Workers to serve again")
        Service.startService(self)
        from twisted.internet import reactor
        from twisted.internet.task import LoopingCall

        self._reactor = reactor
        self._devnull = os.open(os.devnull, os.O_RDWR)
        if self.handle_signals:
            handlers = {
                signal.SIGHUP: self.reload,
                signal.SIGTTIN: self.add_worker,
                signal.SIGTTOU: self.remove_worker,
            }
            for signum, action in handlers.items():
                self._old_signals[signum] = signal.signal(signum, self._on_signal(action))
            from txsocketserver import _logfiles

            self._old_signals[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
            _logfiles.handle_sigusr1(also=self._reopen_workers_logs)
        self._checker = LoopingCall(self._check_workers)
        self._checker.start(CHECK_INTERVAL, now=False)
        self._heartbeat.start()
        self._reconcile()

    def _reopen_workers_logs(self) -> None:
        # In the signal handler (main thread): signalling is all it does.
        for process in self._processes:
            process.signal(signal.SIGUSR1)

    def _on_signal(self, action: Any) -> Any:
        def handler(signum: int, frame: Any) -> None:
            # Python runs signal handlers between bytecodes of the main
            # thread, which is the reactor's: hand the work to the reactor.
            self._reactor.callFromThread(self._signalled, signum, action)

        return handler

    def _signalled(self, signum: int, action: Any) -> None:
        _log.info("{signal}: {what}", signal=signal.Signals(signum).name, what=action.__doc__)
        action()

    def reload(self) -> None:
        """starting new workers, then draining the old ones"""
        if self._stopping is not None:
            return
        from txsocketserver._twisted.tls import unloadable

        problems = unloadable(listener.tls for listener in self.listeners if listener.tls)
        if problems:
            # New workers would fail on these files: the old ones keep serving.
            for problem in problems:
                _log.error("not reloading, the certificates are bad: {problem}", problem=problem)
            return
        self._generation += 1
        self._failures = 0
        self._next_start = 0.0
        self._announced = False
        systemd.notifier().reloading()
        self._reconcile()

    def add_worker(self) -> None:
        """one worker more"""
        self.workers += 1
        self._reconcile()

    def remove_worker(self) -> None:
        """one worker fewer (never fewer than one)"""
        self.workers = max(1, self.workers - 1)
        self._reconcile()

    def stopService(self) -> Deferred[None]:
        """Refuse new connections, let every worker drain, close the sockets.

        The Deferred fires once every worker has exited: by itself within
        ``drain_timeout``, or killed ``KILL_GRACE`` seconds after that.
        """
        Service.stopService(self)
        if self._stopping is not None:
            return self._stopping
        self.health.begin_stop()  # /readyz answers 503, systemd hears STOPPING=1
        self._stopping = Deferred()
        if self.drain_delay > 0 and self._reactor is not None:
            # Phase 1: the workers go on serving while load balancers, told
            # by /readyz, stop sending; then the drain below.
            self._delayed_stop = self._reactor.callLater(self.drain_delay, self._drain)
            return self._stopping
        self._drain()
        return self._stopping

    def _drain(self) -> None:
        """Stop accepting, tell every worker to drain (the stop's second phase)."""
        self._delayed_stop = None
        self._heartbeat.stop()
        for signum, old in self._old_signals.items():
            signal.signal(signum, old)
        self._old_signals = {}
        if self._pending_start is not None and self._pending_start.active():
            self._pending_start.cancel()
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        for listener in self.listeners:
            listener.stop_listening()
        for process in self._processes:
            process.terminate()
        self._notify_ready()
        self._maybe_stopped()

    def kill_now(self) -> None:
        """Kill every worker at once (a second stop signal)."""
        if self._delayed_stop is not None and self._delayed_stop.active():
            self._delayed_stop.cancel()
            self._drain()
        for process in self._processes:
            process.signal(signal.SIGKILL)

    def _maybe_stopped(self) -> None:
        if self._stopping is None or self._processes or self._stopping.called:
            return
        for listener in self.listeners:
            listener.close()
        if self._devnull is not None:
            os.close(self._devnull)
        _log.info("all workers stopped")
        self._stopping.callback(None)

    # -- keeping the right workers running ----------------------------------------

    def _reconcile(self) -> None:
        if self._stopping is not None or not self.running:
            return
        current = [
            p
            for p in self._processes
            if p.generation == self._generation and not p.stopping and p.retiring is None
        ]
        ready = [p for p in current if p.ready]
        # Old generations' and retiring workers drain one for each new worker
        # ready beyond the number wanted: never fewer serving than before.
        outgoing = [p for p in self._processes if p not in current and not p.stopping]
        surplus = len(ready) + len(outgoing) - self.workers
        for process in sorted(outgoing, key=lambda p: (p.ready, p.started))[: max(0, surplus)]:
            if process.generation < self._generation and process.retiring is None:
                self.restarts["reload"] += 1
            _log.info("stopping {worker} (replaced)", worker=process)
            process.terminate()
        extra = len(current) - self.workers
        if extra > 0:
            for process in sorted(current, key=lambda p: (p.ready, p.started))[:extra]:
                _log.info("stopping {worker} (one worker fewer)", worker=process)
                process.terminate()
        missing = self.workers - len(current)
        if missing <= 0:
            return
        delay = self._next_start - time.monotonic()
        if delay > 0:
            if self._pending_start is None or not self._pending_start.active():
                self._pending_start = self._reactor.callLater(delay, self._reconcile)
            return
        for _ in range(missing):
            self._spawn()

    def _spawn(self) -> None:
        listeners = [listener for listener in self.listeners if listener.inherited]
        control_fd = FIRST_LISTEN_FD + len(listeners)
        max_requests = self.max_requests
        if max_requests and self.max_requests_jitter:
            max_requests += random.randint(0, self.max_requests_jitter)
        spec = {
            "handler": self.handler,
            "server": self.server,
            "mode": self.mode,
            "max_threads": self.max_threads,
            "drain_timeout": self.drain_timeout,
            "worker_timeout": self.worker_timeout,
            "heartbeat": beat_interval(self.worker_timeout) if self.worker_timeout else None,
            "log_file": self.log_file,
            "max_requests": max_requests,
            "trusted_proxies": self.trusted_proxies,
            "header_timeout": self.header_timeout,
            "control_fd": control_fd,
            "observability": self.observability,
            "sys_path": [os.getcwd() if entry == "" else entry for entry in sys.path],
            "listeners": [
                {**listener.worker_spec(), "settings": self._listener_settings[id(listener)]}
                for listener in self._ordered_listeners()
            ],
        }
        assert self._devnull is not None  # startService opened it
        child_fds: dict[int, int | str] = {
            0: self._devnull,
            1: 1,
            2: 2,
            control_fd: "r",
            control_fd + 1: "w",
        }
        for index, listener in enumerate(listeners):
            child_fds[FIRST_LISTEN_FD + index] = listener.sock.fileno()
        env = dict(os.environ)
        for name in systemd.ENVIRONMENT:
            env.pop(name, None)  # only the supervisor speaks to systemd
        env["LISTEN_FDS"] = str(len(listeners))
        env["LISTEN_FDNAMES"] = ":".join(f"listener{i}" for i in range(len(listeners)))
        env.pop("LISTEN_PID", None)
        process = _WorkerProcess(self, self._generation, control_fd)
        if self.max_worker_lifetime is not None:
            process.lifetime = self.max_worker_lifetime + random.uniform(
                0, self.max_worker_lifetime_jitter
            )
        argv = [sys.executable, "-m", "txsocketserver._workers.worker", json.dumps(spec)]
        self._reactor.spawnProcess(
            process, sys.executable, argv, env=env, path=os.getcwd(), childFDs=child_fds
        )
        assert process.transport is not None
        process.pid = process.transport.pid
        self._processes.append(process)
        _log.info("started {worker}", worker=process)

    def _ordered_listeners(self) -> list[BoundSocket]:
        # Inherited sockets first, in order, so that listener i of the spec is
        # fd FIRST_LISTEN_FD + i; the reuse_port ones, bound by workers, after.
        return [x for x in self.listeners if x.inherited] + [
            x for x in self.listeners if not x.inherited
        ]

    # -- events from workers -----------------------------------------------------------

    def _worker_ready(self, process: _WorkerProcess) -> None:
        self._failures = 0
        _log.info("{worker} ready", worker=process)
        self._reconcile()
        self._notify_ready()
        if not self._announced and self._stopping is None and self._all_ready():
            self._announced = self._started_once = True
            self._heartbeat.ready()
        self._heartbeat.send_status()

    def _heard_from(self, process: _WorkerProcess) -> None:
        """A line from *process*: its reactor turns; re-arm the deadline for silence."""
        if not self.worker_timeout or process.stopping:
            return
        # A worker reports every beat interval while its reactor turns: after
        # that much more silence, it has been stuck for worker_timeout.
        silence = self.worker_timeout + beat_interval(self.worker_timeout)
        if process._silence is not None and process._silence.active():
            process._silence.reset(silence)
        else:
            process._silence = self._reactor.callLater(silence, self._worker_silent, process)

    def _worker_stuck(self, process: _WorkerProcess, seconds: str) -> None:
        """The worker says a serving loop made no progress for ``worker_timeout``."""
        if process.stopping or self._stopping is not None:
            return
        _log.error(
            "{worker} made no progress for {seconds}s (--worker-timeout {timeout}; its "
            "threads' stacks are logged above); killing it and starting another",
            worker=process,
            seconds=seconds,
            timeout=self.worker_timeout,
        )
        self._replace_stuck(process, signal.SIGKILL)

    def _worker_silent(self, process: _WorkerProcess) -> None:
        """Nothing from the worker for ``worker_timeout`` plus a beat: its reactor is stuck."""
        if process.stopping or process.ended or self._stopping is not None:
            return
        _log.error(
            "{worker} missed its heartbeat for {timeout}s (its reactor is stuck in a "
            "blocking call?); SIGABRT writes its threads' stacks to its stderr; "
            "killing it and starting another",
            worker=process,
            timeout=self.worker_timeout,
        )
        self._replace_stuck(process, signal.SIGABRT)
        self._reactor.callLater(KILL_GRACE, process.signal, signal.SIGKILL)

    def _replace_stuck(self, process: _WorkerProcess, signum: int) -> None:
        process.stopping = True
        self._replaced += 1
        self.restarts["timed_out"] += 1
        process.signal(signum)
        self._reconcile()

    def _worker_retiring(self, process: _WorkerProcess) -> None:
        self.restarts["max_requests"] += 1
        _log.info("{worker} reached --max-requests; replacing it", worker=process)
        self._reconcile()

    def _worker_ended(self, process: _WorkerProcess, how: BaseException) -> None:
        self._processes.remove(process)
        self._keep_counts(process)
        status = getattr(how, "exitCode", None)
        killed_by = getattr(how, "signal", None)
        outcome = f"signal {signal.Signals(killed_by).name}" if killed_by else f"status {status}"
        if not killed_by and status in EXIT_MEANINGS:
            outcome += f": {EXIT_MEANINGS[status]}"
        if process.stopping or self._stopping is not None:
            _log.info("{worker} exited ({outcome})", worker=process, outcome=outcome)
        elif not process.ready:
            self._failures += 1
            backoff = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self._failures - 1))
            self._next_start = time.monotonic() + backoff
            _log.error(
                "{worker} died before it was ready ({outcome}); next start in {backoff}s",
                worker=process,
                outcome=outcome,
                backoff=backoff,
            )
        else:
            self.restarts["exited"] += 1
            self._replaced += 1
            _log.warn("{worker} died ({outcome}); replacing it", worker=process, outcome=outcome)
        self._maybe_stopped()
        self._reconcile()

    def _check_workers(self) -> None:
        now = time.monotonic()
        for process in list(self._processes):
            if process.stopping:
                continue
            if not process.ready:
                if now - process.started > START_TIMEOUT:
                    _log.error("{worker} not ready after {s}s; killing it", worker=process,
                               s=START_TIMEOUT)  # fmt: skip
                    process.stopping = True
                    process.signal(signal.SIGKILL)
                continue
            if process.retiring is not None:
                continue
            if self.max_worker_memory is not None and process.pid is not None:
                rss = resident_memory(process.pid)
                if rss is not None and rss > self.max_worker_memory * 1e6:
                    self.restarts["max_memory"] += 1
                    self._retire(process, f"uses {rss / 1e6:.0f} MB, over --max-worker-memory")
                    continue
            assert process.ready_at is not None  # set with ready
            if process.lifetime is not None and now - process.ready_at >= process.lifetime:
                self.restarts["max_lifetime"] += 1
                self._retire(process, f"has served {now - process.ready_at:.1f}s, its lifetime")
        self._reconcile()

    def _retire(self, process: _WorkerProcess, why: str) -> None:
        process.retiring = why
        self._replaced += 1
        _log.info("{worker} {why}: replacing it (it drains once its successor is ready)",
                  worker=process, why=why)  # fmt: skip

    # -- what systemd is told ----------------------------------------------------------

    def _health(self) -> str | None:
        """None while at least one worker serves, else why not (the watchdog's view)."""
        if not self._started_once or any(p.ready and not p.stopping for p in self._processes):
            return None  # starting: systemd's start timeout covers that
        return "no worker is ready"

    def _status(self) -> str:
        """The ``STATUS=`` line: the workers' live counts."""
        ready = sum(1 for p in self._processes if p.ready and not p.stopping)
        starting = sum(1 for p in self._processes if not p.ready and not p.stopping)
        stopping = sum(1 for p in self._processes if p.stopping)
        return (
            f"{ready} of {self.workers} workers ready, {starting} starting, {stopping} "
            f"stopping; generation {self._generation}; {self._replaced} replaced"
        )

    # -- metrics (--metrics): the sum over the workers -------------------------------

    def _keep_counts(self, process: _WorkerProcess) -> None:
        # An exited worker's counters stay in the sum (without its gauges),
        # so that no counter goes backwards across a reload or a crash.
        for label, snapshot in process.snapshot.items():
            kept = self._exited_counts.get(label)
            self._exited_counts[label] = merge(
                [snapshot] if kept is None else [kept, snapshot], gauges=False
            )

    def metrics_snapshots(self) -> dict[str, dict[str, Any]]:
        """``{server label: snapshot}`` summed over every worker since the start:
        the last counts each live worker sent, plus those of exited workers."""
        sums: dict[str, list[dict[str, Any]]] = {
            label: [counts] for label, counts in self._exited_counts.items()
        }
        for process in self._processes:
            for label, snapshot in process.snapshot.items():
                sums.setdefault(label, []).append(snapshot)
        return {label: merge(snapshots) for label, snapshots in sorted(sums.items())}

    def worker_counts(self) -> dict[str, Any]:
        """Workers alive (started, not yet exited) and restarts by cause."""
        return {"alive": len(self._processes), "restarts": dict(self.restarts)}


def run_workers(
    workers: Workers, *, describe: str | None = None, begin_logging: bool = True
) -> int:
    """Run *workers* in this process until SIGTERM or SIGINT; return the exit status.

    Runs the reactor in the calling (main) thread, logs to stderr (unless
    *begin_logging* is false: the caller has started Twisted's logging), and
    returns 0 after a graceful stop; a second SIGTERM/SIGINT kills the
    workers at once.  For a program of its own; under ``twistd``, use the
    service.
    """
    from twisted.internet import reactor as installed
    from twisted.logger import globalLogBeginner, textFileLogObserver

    reactor: Any = installed
    if begin_logging:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    if describe:
        _log.info("{description}", description=describe)
    signals: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        signals.append(signum)
        if len(signals) == 1:
            reactor.callFromThread(stop_gracefully, signum)
        else:
            reactor.callFromThread(workers.kill_now)

    def stop_gracefully(signum: int) -> None:
        _log.info("{signal}: stopping", signal=signal.Signals(signum).name)
        workers.stopService().addBoth(lambda _: reactor.stop())

    def install() -> None:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        workers.startService()

    reactor.callWhenRunning(install)
    reactor.run(installSignalHandlers=True)
    return 0


def start_workers(*args: Any, **kwargs: Any) -> Deferred[Workers]:
    """Make and start a :class:`~txsocketserver.Workers` service from code running on the reactor.

    Takes :class:`Workers`' arguments (``handle_signals`` defaults to false
    here); returns a Deferred firing with the service once its first workers
    are ready (stop it with ``stopService()``), or failing with the binding
    error.
    """
    kwargs.setdefault("handle_signals", False)
    try:
        workers = Workers(*args, **kwargs)
    except BaseException:
        from twisted.internet.defer import fail

        return fail()
    workers.startService()
    return workers.when_ready().addCallback(lambda _: workers)


__all__ = ["Workers", "class_spec", "run_workers", "start_workers"]
