# -*- test-case-name: tests.test_service -*-
"""Servers as Twisted services, and the graceful stop they share with the CLI.

Theory of operation
===================

A server's hooks are blocking user code, so a service never runs them on the
reactor thread: :meth:`ServerService.startService` starts a *serving thread*
that runs ``serve_forever()``, exactly as a blocking program would, against
the reactor that is already running (``twistd``, ``react``, a ``.tac``).
Handler errors go to ``twisted.logger`` while the service runs.

Stopping is a *graceful drain* (:func:`stop_gracefully`), run in a helper
thread so that the reactor keeps running (it carries the bytes of the requests
being drained):

1. ``shutdown()`` is requested: the serving loop takes no new request.  An
   endpoint server also stops listening at once (new clients are refused,
   connections accepted but not yet taken are closed); a socket server closes
   its listening socket as soon as the loop has left.
2. The requests in flight (between ``verify_request`` and the end of their
   ``shutdown_request``, wherever they run) may finish, for up to
   ``drain_timeout`` seconds.
3. The stragglers are then shut down (``request.shutdown(SHUT_RDWR)``): a
   handler blocked reading sees end of file, one writing gets
   ``BrokenPipeError``, so well-behaved handlers end within moments.
4. ``server_close()`` runs; if stragglers still remain, without waiting for
   them (``block_on_close`` is turned off for that call).

The Deferred of ``stopService`` fires when that is done.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from txsocketserver._observability.health import Health
from txsocketserver._twisted import reactor as _reactor

#: Seconds ``stopService`` lets requests in flight finish before closing them.
DEFAULT_DRAIN_TIMEOUT = 30.0
#: Seconds handlers get to end after their connections were shut down under them.
STRAGGLER_GRACE = 2.0

_log = Logger(namespace="txsocketserver")


class _ErrorLog:
    """Where ``handle_error`` logs in the Twisted world: a handler's exception
    is an error-level event (``Logger.failure`` would make it critical).

    A client that went away while being served (a reset, a closed pipe: a
    load balancer's HTTP check that hangs up once it has the status line, a
    user who gave up) is nobody's bug: one info line, no traceback.
    """

    def failure(self, format: str, **kwargs: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionResetError, BrokenPipeError)):
            _log.info(
                "connection from {client_address} went away while being served: {error}",
                client_address=kwargs.get("client_address"),
                error=error,
            )
            return
        _log.failure(format, level=LogLevel.error, **kwargs)


def log_errors(server: Any) -> None:
    """Make ``server.handle_error`` log to ``twisted.logger`` (namespace
    ``txsocketserver``, level error, with ``client_address``) instead of
    printing to stderr; ``python -m txsocketserver`` and services do this."""
    server._log_errors_to(_ErrorLog())


def _abort(request: Any) -> None:
    """Make a handler blocked on ``request`` return: EOF for reads, EPIPE for
    writes; an async handler is cancelled at its ``await`` instead."""
    cancel_handler = getattr(request, "cancel_handler", None)
    if cancel_handler is not None:
        cancel_handler()
        return
    shutdown = getattr(request, "shutdown", None)
    if shutdown is None:
        return  # a datagram: nothing to interrupt
    try:
        shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or reset: the handler is on its way out


def abort_requests(server: Any) -> None:
    """Shut down the connections of every request in flight under its handler."""
    for request in server._requests_in_flight():
        _abort(request)


def stop_gracefully(
    server: Any,
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    serving: threading.Thread | None = None,
) -> bool:
    """Stop a server: stop accepting, drain the requests in flight, close it.

    Blocking: call it from any thread but the reactor thread (and not from a
    handler of this server).

    Args:
        server: a txsocketserver server, serving or not.
        drain_timeout: seconds the requests in flight may take to finish
            before their connections are shut down under them.
        serving: the thread running ``serve_forever``, if any, so that a stop
            requested before that loop started still waits for it.

    Returns:
        Whether every request finished by itself within ``drain_timeout``.

    Resource handling:
        The server is closed (``server_close()``) when this returns, even when
        stragglers were cut off.
    """
    _reactor.refuse_reactor_thread("stop_gracefully")
    deadline = time.monotonic() + drain_timeout
    stopper = threading.Thread(target=server.shutdown, name="txsocketserver-shutdown", daemon=True)
    loop_running = serving is not None and serving.is_alive()
    if server._stops_accepting_at_once:
        server._stop_accepting()
        if loop_running:
            # What the listener accepted before the stop (queued for
            # get_request, or reading its PROXY header) is served: the loop
            # stops once it has taken them.
            server._wait_accepted_taken(max(0.0, deadline - time.monotonic()))
    if loop_running:
        stopper.start()
    if loop_running and not server._stops_accepting_at_once:
        # A socket server's loop may still be waiting on its socket: close it
        # only once the loop has left (a synchronous server's loop leaves when
        # the request it is running ends).
        stopper.join(max(0.0, deadline - time.monotonic()))
        if not stopper.is_alive():
            server._stop_accepting()
    drained = server._wait_for_requests(max(0.0, deadline - time.monotonic()))
    if not drained:
        stragglers = server._requests_in_flight()
        _log.warn(
            "{count} request(s) still running after {timeout}s; closing their connections",
            count=len(stragglers),
            timeout=drain_timeout,
        )
        abort_requests(server)
        server._wait_for_requests(STRAGGLER_GRACE)
    if loop_running:
        stopper.join(STRAGGLER_GRACE)
    if not server._wait_for_requests(0):
        # Handlers that ignore EOF and EPIPE: close without waiting for them.
        server.block_on_close = False
    server.server_close()
    return drained


class ServerService(Service):
    """Run a txsocketserver server as a Twisted ``IService``.

    ``ServerService(server).setServiceParent(application)`` in a ``.tac`` file,
    or ``MultiService.addService``: any server (stream or datagram; sync,
    threading or forking; socket or endpoint address) serves while the service
    runs, next to other Twisted services on the same reactor.

    Args:
        server: the server, normally bound and activated by its constructor.
            An endpoint server made with ``bind_and_activate=False`` starts
            listening in ``startService`` instead, without blocking the reactor
            (the way to use endpoints that listen asynchronously).
        drain_timeout: seconds ``stopService`` lets requests in flight finish
            before their connections are shut down (default 30).
        poll_interval: passed to ``serve_forever``; how often
            ``service_actions()`` runs.
        drain_delay: seconds ``stopService`` keeps serving after the stop
            began (``health`` no longer ready) before it stops accepting, so
            that load balancers stop sending first (default 0).
        health: the :class:`~txsocketserver.Health` whose stop begins when
            ``stopService`` is called (default: a new one, ``self.health``).

    Resource handling:
        ``stopService`` closes the server; the service cannot be started again
        (``RuntimeError``).

    Error handling:
        While the service runs, handler errors are logged with
        ``twisted.logger`` (a ``Failure``) rather than printed to stderr, unless
        ``handle_error`` is overridden.  A failure to start (listening fails,
        ``serve_forever`` raises) is logged, and fails the Deferred of
        :func:`start_server`.
    """

    def __init__(
        self,
        server: Any,
        *,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        poll_interval: float = 0.5,
        drain_delay: float = 0.0,
        health: Health | None = None,
    ) -> None:
        self.server = server
        self.drain_timeout = drain_timeout
        self.poll_interval = poll_interval
        self.drain_delay = drain_delay
        self.health = health if health is not None else Health()
        self._serving: threading.Thread | None = None
        self._started: Deferred[ServerService] | None = None
        self._stopped: Deferred[None] | None = None

    def __repr__(self) -> str:
        return f"<ServerService {self.name or ''} for {self.server!r}>"

    def startService(self) -> None:
        """Start serving in a new thread; never blocks the reactor."""
        # A failure to start is logged where it happens.
        self._start().addErrback(lambda failure: None)

    def _start(self) -> Deferred[ServerService]:
        if self._started is not None:
            raise RuntimeError("a ServerService runs once; make a new server to serve again")
        Service.startService(self)
        started: Deferred[ServerService] = Deferred()
        self._started = started
        reactor = _reactor.get_reactor()
        # The serving thread needs the reactor running (it would otherwise
        # start a private one in the background, and the owner's run() fails).
        reactor.callWhenRunning(self._listen_then_serve, started)
        return started

    def _listen_then_serve(self, started: Deferred[ServerService]) -> None:
        # Nothing in the Twisted world; on the blocking world's reactor (a
        # service started there through call_in_reactor), keep it running
        # until the service has stopped.
        _reactor.hold(self)
        listening = None if self._stopped is not None else self.server._start_listening()
        if listening is None:
            listening = succeed(None)

        def serve(_: object) -> ServerService:
            if self._stopped is not None:
                raise RuntimeError("the service was stopped before it started serving")
            self._serving = threading.Thread(
                target=self._serve,
                name=f"txsocketserver-serve-{self.name or type(self.server).__name__}",
                daemon=True,
            )
            log_errors(self.server)
            self._serving.start()
            return self

        def failed(failure: Failure) -> Failure:
            _log.failure("{server!r} could not start", failure, server=self.server)
            _reactor.release(self)
            return failure

        listening.addCallback(serve).addErrback(failed).chainDeferred(started)

    def _serve(self) -> None:
        try:
            self.server.serve_forever(self.poll_interval)
        except BaseException:
            if self._stopped is None:
                _log.failure("serve_forever of {server!r} failed", server=self.server)

    def stopService(self) -> Deferred[None]:
        """Stop accepting, drain, close; the Deferred fires when that is done.

        The stop begins (``health`` turns not ready) at once; the server goes
        on serving for ``drain_delay`` seconds, then takes no new request;
        the requests in flight get ``drain_timeout`` seconds to finish; the
        connections of those still running are then shut down under them,
        and ``server_close()`` runs.
        """
        Service.stopService(self)
        if self._stopped is not None:
            return self._stopped
        self.health.begin_stop()  # /readyz answers 503, systemd hears STOPPING=1
        stopped: Deferred[None] = Deferred()
        self._stopped = stopped
        reactor = _reactor.get_reactor()

        def stop() -> None:
            if self.drain_delay > 0:
                time.sleep(self.drain_delay)  # phase 1: serving, but no longer ready
            try:
                drained = stop_gracefully(
                    self.server, drain_timeout=self.drain_timeout, serving=self._serving
                )
            except BaseException:
                reactor.callFromThread(stopped.errback, Failure())
                reactor.callFromThread(_reactor.release, self)
                return
            finally:
                self.server._log_errors_to(None)
            _log.info(
                "stopped serving at {address} ({how})",
                address=self.server.server_address,
                how="drained" if drained else "stragglers closed",
            )
            reactor.callFromThread(stopped.callback, None)
            reactor.callFromThread(_reactor.release, self)

        threading.Thread(target=stop, name="txsocketserver-stop", daemon=True).start()
        return stopped


def start_server(
    server: Any, *, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, poll_interval: float = 0.5
) -> Deferred[ServerService]:
    """Start serving ``server`` from code running on the reactor; never blocks.

    Args:
        server: as for :class:`ServerService` (an endpoint server made with
            ``bind_and_activate=False`` starts listening here).
        drain_timeout: as for :class:`ServerService`.
        poll_interval: as for :class:`ServerService`.

    Returns:
        A Deferred firing with the running :class:`ServerService` once the
        server listens and its serving thread runs; stop it with
        ``service.stopService()`` (a Deferred too).  It fails with the
        listening error instead, the server then being closed.
    """
    service = ServerService(server, drain_timeout=drain_timeout, poll_interval=poll_interval)
    try:
        started = service._start()
    except BaseException:
        return fail()

    def failed(failure: Failure) -> Failure:
        service.running = False
        server.server_close()
        return failure

    return started.addErrback(failed)


__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "STRAGGLER_GRACE",
    "ServerService",
    "abort_requests",
    "log_errors",
    "start_server",
    "stop_gracefully",
]
