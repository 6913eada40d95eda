# -*- test-case-name: tests.test_stream_hooks,tests.test_stream_lifecycle,tests.test_limits -*-
"""``BaseServer``: the ``socketserver`` template method, driven by the reactor.

The loop has the stdlib's shape and calls the same hooks in the same order on
the same thread (the caller of ``serve_forever``/``handle_request``).  What
changes is how it waits: instead of ``select()`` on the socket it waits on an
:class:`~txsocketserver._twisted.interfaces.IRequestReadiness` (a ``poll`` of
the socket and a wake-up pipe; a queue the reactor feeds, for an endpoint).
That gives two things the stdlib lacks: ``shutdown()`` wakes the loop at once
instead of waiting out ``poll_interval``, and the same server can be fed by a
Twisted endpoint instead of a socket.
"""

from __future__ import annotations

import _thread
import contextlib
import errno
import socket
import sys
import time
from collections.abc import Iterator

from txsocketserver._core import lifecycle

TYPE_CHECKING = False  # not typing's: see txsocketserver._core
if TYPE_CHECKING:
    from typing import Any

    from typing_extensions import Self

    from txsocketserver._core.lifecycle import LifecycleObserver

    # The roles the core's strategies fill, for the type checker only: the
    # other core modules take them from here, so that the core names the
    # Twisted side in two places (this one and twisted_side()).
    from txsocketserver._twisted import interfaces

    IProcessDispatcher = interfaces.IProcessDispatcher
    IRequestReadiness = interfaces.IRequestReadiness
    IThreadDispatcher = interfaces.IThreadDispatcher

# accept() failing for lack of resources leaves the request queued, so the
# socket stays readable; pausing briefly stops the loop from spinning on it
# while the process is out of fds.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RESOURCE_BACKOFF = 0.05


def log_warning(message: str, *args: Any) -> None:
    """Log a warning on the ``"txsocketserver"`` logger (``logging`` loaded on first use)."""
    # The stdlib's ``logging`` rather than ``twisted.logger``: servers run
    # mostly in programs that never start a Twisted log observer, where a
    # twisted.logger event would sit unseen in its start-up buffer, while a
    # ``logging`` warning reaches stderr even unconfigured.  Under ``twistd``,
    # stderr is itself redirected into the Twisted log, so the warning lands there.
    import logging

    logging.getLogger("txsocketserver").warning(message, *args)


def twisted_side() -> Any:
    """``txsocketserver._twisted.strategies``: all the core asks of the Twisted side.

    The core's one import of a part above it, made when a server is made or
    first serves, never when the package is imported (see ``txsocketserver._core``).
    """
    from txsocketserver._twisted import strategies

    return strategies


def _refuse_reactor_thread(call: str) -> None:
    """``RuntimeError`` if *call* (a blocking API) is made on the reactor thread."""
    twisted_side().refuse_reactor_thread(call)


def run_request(server: Any, request: Any, client_address: Any) -> bool:
    """Run one request away from the serving thread, as the stdlib's request threads
    and children do.

    ``finish_request``, then ``handle_error`` if it raised an ``Exception``, and
    ``shutdown_request`` always.  Returns whether the handler succeeded.  Both
    mixins run this where the request runs: a pool thread, a forked child.
    """
    try:
        server.finish_request(request, client_address)
        return True
    except Exception:
        server._request_failed(request)
        server.handle_error(request, client_address)
        return False
    finally:
        server.shutdown_request(request)


class BaseServer:
    """Base class for server classes.

    Methods for the caller:

    - ``__init__(server_address, RequestHandlerClass)``
    - ``serve_forever(poll_interval=0.5)``
    - ``shutdown()``
    - ``handle_request()``  # if you do not use serve_forever()
    - ``fileno()`` -> int   # for selectors

    Methods that may be overridden:

    - ``server_bind()``, ``server_activate()``, ``get_request()`` -> request, client_address
    - ``handle_timeout()``, ``verify_request(request, client_address)``
    - ``server_close()``, ``process_request(request, client_address)``
    - ``shutdown_request(request)``, ``close_request(request)``, ``service_actions()``
    - ``handle_error()``

    Class variables that may be overridden by derived classes or instances:
    ``timeout``, ``address_family``, ``socket_type``, ``allow_reuse_address``,
    ``allow_reuse_port``.

    Instance variables: ``RequestHandlerClass``, ``socket``.
    """

    # Seconds handle_request() waits before calling handle_timeout(); None waits forever.
    timeout: float | None = None
    # Ours: at most this many requests in flight (connections, for stream
    # servers) at once; at the cap serve_forever takes no new request, so
    # further clients wait in the kernel backlog.  None: no limit.
    max_connections: int | None = None
    # Ours: seconds a connection may make no progress either way; a blocking
    # handler's read or write then raises TimeoutError (a socket timeout: it
    # reaches handle_error, which logs it, and the connection is closed).  An
    # async connection is closed and a warning logged.  None: no limit.
    idle_timeout: float | None = None

    if TYPE_CHECKING:
        # Defined by the subclasses (TCPServer), used by the loop; the
        # stdlib's stubs declare them here too.
        def get_request(self) -> tuple[Any, Any]: ...

        def fileno(self) -> int: ...

    # Private: True when process_request() hands requests to another thread or
    # process, whose code then calls _request_finished() itself.
    _requests_finish_elsewhere = False

    # Private: whether the class can serve an async handler class (the socket servers).
    _serves_async_handlers = False

    # Private: get_request() failures for lack of resources (EMFILE...) in the
    # current episode, and when it began; 0 once a request is taken again.
    _accept_failures = 0
    _accept_failing_since = 0.0

    # Private: the lifecycle observers (see add_observer), a tuple replaced
    # whole so that any thread may read it without a lock; empty: none.
    _observers: tuple[Any, ...] = ()
    # A forked request's copy of the server tells nobody: its parent does.
    _serving_process_only: tuple[str, ...] = ("_observers",)

    def __init__(self, server_address: Any, RequestHandlerClass: Any) -> None:
        """Constructor.  May be extended, do not override.

        Error handling:
            ``TypeError`` for an async handler class on a server that cannot run
            one (a ``BaseServer`` subclass of your own: use ``TCPServer`` and co).
        """
        if getattr(RequestHandlerClass, "_txsocketserver_async", False) and not (
            self._serves_async_handlers
        ):
            raise TypeError(
                f"{type(self).__name__} cannot run {RequestHandlerClass.__name__}, an async "
                "handler class: serve it with TCPServer, UnixStreamServer, UDPServer or "
                "UnixDatagramServer (or a subclass)"
            )
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        # Made on first use, by __sync(): see there.
        self.__is_shut_down: Any = None
        self.__sync_lock = _thread.allocate_lock()
        self.__shutdown_request = False
        self.__readiness: IRequestReadiness | None = None
        self.__serving_thread: int | None = None
        # Requests between verify_request() and the end of their handling, so
        # that a graceful stop can wait for them and close the stragglers.
        self.__in_flight: dict[int, Any] = {}
        # The lifecycle records of the observed requests in flight (see add_observer).
        self.__records: dict[int, Any] = {}
        # The hot path (every request) changes __in_flight without it, and
        # takes it only to notify a waiting drain or serving loop (see
        # _request_finished); the Condition on it is for those waiters.
        self.__in_flight_lock = _thread.allocate_lock()
        self.__in_flight_changed: Any = None  # a Condition on it, made by __sync()
        self.__drain_waiters = 0
        self.__cap_waiters = 0  # serving loops waiting at max_connections
        # Where handle_error() logs while the server runs as a Twisted service
        # (a twisted.logger.Logger); None prints to stderr like the stdlib.
        # Name-mangled so that ForkingMixIn does not copy it to its children.
        self.__error_log: Any = None

    def server_activate(self) -> None:
        """Called by the constructor to activate the server.  May be overridden."""

    # -- the serving loop ------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Handle one request at a time until ``shutdown()``.

        ``service_actions()`` runs at least every *poll_interval* seconds;
        ``shutdown()`` does not wait for that interval to pass.

        Error handling:
            ``RuntimeError`` if called on the Twisted reactor thread (it would
            deadlock); use :class:`txsocketserver.ServerService` there.
        """
        _refuse_reactor_thread("serve_forever")
        self.__sync()[0].clear()
        try:
            with self.__watching() as readiness:
                while not self.__shutdown_request:
                    if self.max_connections is not None and self.__at_connection_cap(
                        poll_interval
                    ):
                        ready = False
                    else:
                        ready = readiness.wait(poll_interval)
                    if self.__shutdown_request:
                        break
                    if ready:
                        self._handle_request_noblock()
                    self.service_actions()
                    self._after_serving_step()
        finally:
            self.__shutdown_request = False
            self.__sync()[0].set()

    def shutdown(self) -> None:
        """Stop the ``serve_forever`` loop and wait until it has stopped.

        Called from inside a handler that runs in the serving loop's own thread
        (every handler of a synchronous server), waiting would deadlock, as it
        does in the stdlib.  Here it returns at once instead, and
        ``serve_forever`` returns as soon as that handler finishes.

        Error handling:
            ``RuntimeError`` if called on the Twisted reactor thread.
        """
        _refuse_reactor_thread("shutdown")
        self.__shutdown_request = True
        readiness = self.__readiness
        if readiness is not None:
            readiness.wake()
        if self.__cap_waiters:
            changed = self.__sync()[1]
            with changed:
                changed.notify_all()
        if _thread.get_ident() == self.__serving_thread:
            return
        self.__sync()[0].wait()

    def service_actions(self) -> None:
        """Called by ``serve_forever`` once per loop.  May be overridden, e.g. by
        a mixin that needs to do periodic work."""

    def handle_request(self) -> None:
        """Handle one request, waiting at most ``timeout`` seconds for it.

        The timeout is the smaller of ``self.timeout`` and the socket's own;
        ``handle_timeout()`` is called when it passes with no request.  With
        an async handler class: accept one request and start its handler on
        the reactor, then return (as a threading server returns once the
        request runs on its thread).
        """
        _refuse_reactor_thread("handle_request")
        timeout = self._socket_timeout()
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.__watching(once=True) as readiness:
            while True:
                if readiness.wait(timeout):
                    return self._handle_request_noblock()
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout < 0:
                        return self.handle_timeout()

    def _handle_request_noblock(self) -> None:
        """Take one request and run it through the hooks.

        Called when the socket is readable, so ``get_request()`` should not block.
        """
        try:
            request, client_address = self.get_request()
        except OSError as exc:
            if exc.errno in _RESOURCE_ERRNOS:
                self._accept_failed(exc)
                time.sleep(_RESOURCE_BACKOFF)
            return
        if self._accept_failures:
            self._accept_recovered()
        record = self._accepted_record(request, client_address) if self._observers else None
        if self.idle_timeout is not None and hasattr(request, "settimeout"):
            request.settimeout(self.idle_timeout)
        self._serve_request(request, client_address, record)

    def _serve_request(self, request: Any, client_address: Any, record: Any = None) -> None:
        """``verify_request`` → ``process_request``, and ``handle_error`` for
        what that raises: the one lifecycle of a request, whichever strategy
        took it (the serving thread here, the reactor for async handlers).

        *record*: its lifecycle record, if observed.  As in the stdlib, what
        ``verify_request`` raises propagates.
        """
        if not self.verify_request(request, client_address):
            if record is not None:
                lifecycle.refused(record, lifecycle.VERIFY_REQUEST)
            self.shutdown_request(request)
            if record is not None:
                lifecycle.ended(record)
            return
        self._request_started(request, record)
        try:
            self.process_request(request, client_address)
        except Exception:
            self._request_failed(request)
            self.handle_error(request, client_address)
            self.shutdown_request(request)
            self._request_finished(request)
        except BaseException:
            self.shutdown_request(request)
            self._request_finished(request)
            raise
        else:
            if not self._requests_finish_elsewhere:
                self._request_finished(request)

    @contextlib.contextmanager
    def __watching(self, once: bool = False) -> Iterator[IRequestReadiness]:
        """A readiness for the duration of one serving call (*once*: ``handle_request``)."""
        readiness = self._request_readiness(once)
        self.__serving_thread = _thread.get_ident()
        self.__readiness = readiness
        try:
            yield readiness
        finally:
            self.__readiness = None
            self.__serving_thread = None
            readiness.close()

    def _accepted_record(self, request: Any, client_address: Any) -> Any:
        """The lifecycle record of a request ``get_request()`` returned (only
        called with an observer attached): the one its listener made at
        accept (an endpoint's connection), or a new one."""
        record = getattr(request, "lifecycle_record", None)
        if record is None:
            record = lifecycle.accepted(self, client_address, client_address)
        return record

    def _request_readiness(self, once: bool = False) -> IRequestReadiness:
        """Make what tells the serving loop that a request is ready (private
        hook); *once*: for one ``handle_request()`` call."""
        # Loaded here, where serving begins: the Twisted side, which a
        # process that only defines or runs handlers never needs.
        return twisted_side().socket_readiness(self.fileno())  # type: ignore[no-any-return]

    def _socket_timeout(self) -> float | None:
        sock = getattr(self, "socket", None)
        return None if sock is None else sock.gettimeout()

    def _after_serving_step(self) -> None:
        """Private upkeep once per loop (mixins trim idle threads here)."""

    # -- the hooks ---------------------------------------------------------------

    def handle_timeout(self) -> None:
        """Called if no new request arrives within ``self.timeout``.  Overridden
        by ForkingMixIn."""

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return True if we should proceed with this request.  May be overridden
        (access control, for instance)."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Call ``finish_request``, then ``shutdown_request``.  Overridden by
        ForkingMixIn and ThreadingMixIn to run the request elsewhere."""
        self.finish_request(request, client_address)
        self.shutdown_request(request)

    def server_close(self) -> None:
        """Called to clean up the server.  May be overridden."""

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Finish one request by instantiating ``RequestHandlerClass``."""
        self.RequestHandlerClass(request, client_address, self)

    def shutdown_request(self, request: Any) -> None:
        """Called to shutdown and close an individual request."""
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        """Called to clean up an individual request."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Handle an error raised by a handler: print a traceback and continue.

        May be overridden.  Only ``Exception`` reaches here; ``SystemExit`` and
        ``KeyboardInterrupt`` propagate out of the serving loop.  While the
        server runs as a Twisted service, the error is logged as a ``Failure``
        with ``twisted.logger`` instead.
        """
        if self.__error_log is not None:
            self.__error_log.failure(
                "Exception occurred during processing of request from {client_address}",
                client_address=client_address,
            )
            return
        import traceback

        print("-" * 40, file=sys.stderr)
        print(
            "Exception occurred during processing of request from",
            client_address,
            file=sys.stderr,
        )
        traceback.print_exc()
        print("-" * 40, file=sys.stderr)

    # -- the request lifecycle's observers ------------------------------------------

    def add_observer(self, observer: LifecycleObserver) -> None:
        """Have *observer* told of every request's lifecycle from now on.

        *observer* has the methods of :class:`txsocketserver.LifecycleObserver`
        (``accepted``, ``refused``, ``started``, ``ended``), each called with a
        :class:`txsocketserver.ConnectionRecord`, on whichever thread the
        step happens: it must be quick and thread-safe.  Connections already
        accepted are not reported to it.  An observer that raises is logged
        once; serving goes on.  See ``docs/architecture.md``, "The request
        lifecycle", for when each call happens on each kind of server.

        Example::

            class Count(txsocketserver.LifecycleObserver):
                def ended(self, record):
                    print(record.client_address, record.outcome)

            server.add_observer(Count())
        """
        self._observers = (*self._observers, observer)

    @property
    def requests_in_flight(self) -> int:
        """The number of requests between ``verify_request`` and the end of
        their handling now (ours, read-only; any thread: a gauge for metrics).

        A forking server's request leaves this count once it is handed to its
        child: ``active_children`` counts those.
        """
        return len(self.__in_flight)

    def remove_observer(self, observer: LifecycleObserver) -> None:
        """Stop telling *observer* (records already made still tell it their end).

        Error handling:
            ``ValueError`` if *observer* is not attached.
        """
        observers = list(self._observers)
        observers.remove(observer)
        self._observers = tuple(observers)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *args: object) -> None:
        self.server_close()

    # -- private plumbing ---------------------------------------------------------

    def _stop_watching(self) -> None:
        """Make the reactor forget the socket before it is closed."""
        readiness = self.__readiness
        if readiness is not None:
            readiness.close()
            readiness.wake()

    def _rebuilt_in_request_process(self) -> None:
        """Called on a forked request's copy of the server once the carried
        attributes are in place (``ForkingMixIn``): what only the serving
        process may have is replaced here."""

    # -- what a service asks of a server (IServerControl) -------------------------

    @property
    def _stops_accepting_at_once(self) -> bool:
        """Whether ``_stop_accepting`` may run while the serving loop waits (a
        loop waiting on a socket must leave it before it is closed)."""
        return False

    def _start_listening(self) -> Any:
        """A Deferred firing once a server made unbound listens, or ``None``
        when its caller binds it (a socket address)."""
        return None

    def _stop_accepting(self) -> None:
        """Refuse new requests (stream servers: close the listening socket; a
        datagram server's socket is also what in-flight handlers reply through)."""
        sock = getattr(self, "socket", None)
        if sock is not None and getattr(self, "socket_type", None) == socket.SOCK_STREAM:
            sock.close()

    def _wait_accepted_taken(self, timeout: float) -> bool:
        """Whether every connection accepted before ``_stop_accepting`` has
        been taken by the serving loop (only a stream server's endpoint
        listener holds any: a socket's kernel backlog is not ours)."""
        return True

    def _log_errors_to(self, logger: Any) -> None:
        """Route ``handle_error`` to a ``twisted.logger.Logger`` (None: stderr)."""
        self.__error_log = logger

    def __sync(self) -> tuple[Any, Any]:
        """The event ``serve_forever`` sets once it has stopped, and the
        condition a graceful stop waits on for the requests in flight.

        Made on first use, not in ``__init__``: a forking server's template
        builds the children's server object, and importing ``threading`` there
        would make every child run its at-fork hook (about 140 page copies
        and 0.3 ms of CPU per request).
        """
        if self.__is_shut_down is None:
            import threading

            with self.__sync_lock:
                if self.__is_shut_down is None:
                    self.__in_flight_changed = threading.Condition(self.__in_flight_lock)
                    self.__is_shut_down = threading.Event()
        return self.__is_shut_down, self.__in_flight_changed

    # -- requests in flight (graceful stop) ---------------------------------------

    def _request_started(self, request: Any, record: Any = None) -> None:
        """The request passed ``verify_request`` (*record*: its lifecycle record, if observed)."""
        # One dict operation is atomic: no lock (see _request_finished).
        self.__in_flight[id(request)] = request
        if record is not None:
            self.__records[id(request)] = record
            lifecycle.started(record)

    def _request_finished(self, request: Any) -> None:
        """The request's handling is over (called once, wherever it ran)."""
        # The pop is atomic and needs no lock.  A waiter counts itself, under
        # the lock, before it looks at __in_flight: a pop after that look
        # sees the count, and notifies under the lock, which the waiter holds
        # until it sleeps.
        if self.__in_flight.pop(id(request), None) is not None and (
            self.__cap_waiters or (not self.__in_flight and self.__drain_waiters)
        ):
            with self.__in_flight_lock:
                self.__in_flight_changed.notify_all()
        if self.__records:
            record = self.__records.pop(id(request), None)
            if record is not None:
                lifecycle.ended(record)

    def _request_failed(self, request: Any) -> None:
        """``handle_error`` is about to be called for *request* (inside the
        ``except``): its lifecycle record, if any, gets the outcome."""
        if self.__records:
            record = self.__records.get(id(request))
            if record is not None:
                lifecycle.failed(record)

    def _request_refused(self, request: Any, reason: str) -> None:
        """*request* will not be served after all, for *reason* (a
        ``lifecycle`` constant): a failed TLS handshake."""
        if self.__records:
            record = self.__records.get(id(request))
            if record is not None:
                lifecycle.refused(record, reason)

    def _accept_failed(self, error: OSError) -> None:
        """``get_request()`` failed for lack of resources (*error*): the first
        failure of an episode is logged, the others counted (any one thread)."""
        self._accept_failures += 1
        if self._accept_failures == 1:
            self._accept_failing_since = time.monotonic()
            log_warning(
                "%s at %r cannot accept: %s. Retrying every %d ms; new clients wait "
                "in the backlog meanwhile. Logged once until it works again.",
                type(self).__name__,
                self.server_address,
                error,
                _RESOURCE_BACKOFF * 1000,
            )

    def _accept_recovered(self) -> None:
        """A request was taken after resource failures: log the episode's count."""
        log_warning(
            "%s at %r accepts again, after %d failed attempts over %.1f s.",
            type(self).__name__,
            self.server_address,
            self._accept_failures,
            time.monotonic() - self._accept_failing_since,
        )
        self._accept_failures = 0

    def _take_record(self, request: Any) -> Any:
        """Take over the lifecycle record of *request* (``None`` if it has
        none): its end is then the taker's to report (a forked request's)."""
        return self.__records.pop(id(request), None) if self.__records else None

    def __at_connection_cap(self, timeout: float) -> bool:
        """At ``max_connections``: wait (at most *timeout*) for a request to end
        and return True, so that the loop looks again; else False at once."""
        limit = self.max_connections
        if limit is None or len(self.__in_flight) < limit:
            return False
        changed = self.__sync()[1]
        with changed:
            self.__cap_waiters += 1
            try:
                if len(self.__in_flight) >= limit and not self.__shutdown_request:
                    changed.wait(timeout)
            finally:
                self.__cap_waiters -= 1
        return True

    def _requests_in_flight(self) -> list[Any]:
        with self.__in_flight_lock:
            return list(self.__in_flight.values())

    def _wait_for_requests(self, timeout: float | None) -> bool:
        """Wait until no request is in flight; return whether that happened in time."""
        changed = self.__sync()[1]
        with changed:
            self.__drain_waiters += 1
            try:
                return changed.wait_for(lambda: not self.__in_flight, timeout)
            finally:
                self.__drain_waiters -= 1
