# -*- test-case-name: tests.test_async_serving,tests.test_lifecycle -*-
"""``AsyncServing``: how a server with an async handler class serves (its ``IServing``).

The handler class names it (``AsyncBaseRequestHandler._serving_strategy``)
when the server is made; everything here runs on the reactor thread unless a
docstring says otherwise.  Each request goes through the server's one
lifecycle, ``BaseServer._serve_request``, as on a serving thread.  See
``docs/architecture.md`` for the path of a request.
"""

from __future__ import annotations

import errno
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from txsocketserver._async.protocol import Connection
from txsocketserver._async.task import HandlerTask
from txsocketserver._core import lifecycle
from txsocketserver._core.base import _RESOURCE_BACKOFF, _RESOURCE_ERRNOS, log_warning
from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.adopted_transport import ReadMultiplexer, adopted_transport
from txsocketserver._twisted.endpoints import Endpoint, EndpointListener
from txsocketserver._twisted.interfaces import IRequestReadiness, IServing
from txsocketserver._twisted.proxy_stage import ProxyHeaderPolicy
from txsocketserver._twisted.thread_dispatcher import DaemonThread

#: Connections (or datagrams) a readable listening socket yields per reactor turn.
ACCEPTS_PER_READ = 64
#: Connections open from which a new one is read through the server's
#: ``ReadMultiplexer``: a lone connection's events are one at a time, and the
#: multiplexer's own poll would cost more than it saves.
MULTIPLEX_AT = 1
#: Threads of ``to_thread``'s pool when the server sets no ``max_threads``.
DEFAULT_TO_THREAD_MAX = 10
#: Seconds ``server_close()`` waits for cancelled handlers and closing connections.
CLOSE_TIMEOUT = 5.0

_READY = "ready"
_WAKE = "wake"


class ConnectionFactory(Factory):
    """An async server's Twisted factory: one :class:`Connection` per connection.

    Args:
        serving: the server's async strategy.
        proxy_policy: for a PROXY-protocol endpoint, what gives each new
            connection's header policy (the server's ``trusted_proxies`` and
            ``header_timeout`` as they are when it arrives).
    """

    def __init__(
        self, serving: AsyncServing, proxy_policy: Callable[[], ProxyHeaderPolicy] | None = None
    ) -> None:
        self.serving = serving
        self._proxy_policy = proxy_policy

    def buildProtocol(self, addr: Any) -> Connection:
        """A connection accepted by an endpoint's port."""
        policy = None if self._proxy_policy is None else self._proxy_policy()
        protocol = Connection(self.serving, proxy=policy)
        protocol.factory = self
        return protocol


@implementer(IReadDescriptor)
class _SocketAcceptor:
    """Watches the server's own socket and takes requests with ``get_request()``."""

    def __init__(self, serving: AsyncServing, sock: socket.socket) -> None:
        self._serving = serving
        self._socket = sock
        self._fd = sock.fileno()
        self.watching = False
        # Whether disarm() gives the socket back blocking: only if arm() found
        # it so.  The mode belongs to the open file, which --workers share:
        # a worker that stops must not make the others' accept() block.
        self._was_blocking = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "txsocketserver"

    def arm(self) -> None:
        if not self.watching:
            self.watching = True
            self._was_blocking = self._socket.getblocking()
            self._socket.setblocking(False)
            self._serving.reactor.addReader(self)
            if self._serving.accept_sharing is not None:
                self._serving.accept_sharing.watching(self._fd)

    def disarm(self) -> None:
        if self.watching:
            self.watching = False
            self._serving.reactor.removeReader(self)
            if self._was_blocking and self._socket.fileno() != -1:
                self._socket.setblocking(True)

    def doRead(self) -> None:
        serving = self._serving
        if serving.accept_sharing is not None:
            serving.accept_sharing.woken(self._fd)
        get_request = serving.server.get_request
        for _ in range(ACCEPTS_PER_READ):
            if not self.watching:
                return
            try:
                request, client_address = get_request()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    # Out of fds: the request stays queued; look again shortly
                    # instead of spinning on a socket that stays readable.
                    serving.server._accept_failed(exc)
                    self.disarm()
                    serving.reactor.callLater(_RESOURCE_BACKOFF, serving.update_accepting)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                return
            if serving.server._accept_failures:
                serving.server._accept_recovered()
            serving.accepted(request, client_address)

    def connectionLost(self, reason: Failure) -> None:
        self.watching = False


class AsyncEndpointListener(EndpointListener):
    """An endpoint whose port feeds the server's factory directly (no queue).

    The port reads (accepts) only while the server serves; otherwise new
    clients wait in the kernel's backlog, as for a socket server.
    """

    def __init__(
        self, endpoint: Endpoint, *, backlog: int, server: Any, serving: AsyncServing
    ) -> None:
        super().__init__(endpoint, backlog=backlog, server=server)
        self._serving = serving

    def listen_deferred(self) -> Deferred[None]:
        if self._port is not None or self._stopped:
            raise RuntimeError(f"{self.endpoint!r} was already listened on")
        reactor = _reactor.get_reactor()
        deferred = Deferred.fromCoroutine(self._listen(reactor))
        return deferred

    def stop_listening(self) -> None:
        # Forget the port first: a connection ending meanwhile must not
        # resume reading on a port that is closing.
        self._serving.port = None
        super().stop_listening()

    def stop_accepting(self) -> None:
        # Accepted connections go to the factory at once (no queue): nothing
        # accepted waits for a handler, so the port closes as in close().
        self.stop_listening()

    async def _listen(self, reactor: Any) -> None:
        # A PROXY-protocol endpoint: our own header stage on the endpoint it
        # wraps, as for blocking handlers (see EndpointListener).
        self.endpoint.resolve(reactor)
        listen_on, staged = self.endpoint._staged()
        factory = ConnectionFactory(self._serving, self._proxy_policy if staged else None)
        port = await listen_on.listen(factory)
        self._listening(port)
        self._serving.port = port
        self._serving.update_accepting()


def _set_reading(port: Any, reading: bool) -> None:
    method = getattr(port, "startReading" if reading else "stopReading", None)
    if method is not None:
        method()


def serving_for(server: Any, made_by: Callable[..., Any]) -> AsyncServing:
    """The serving of *server*, whose handler class is async: for its
    connections, or for its datagrams.  *made_by* (``handlers.made_by``,
    given by the handler class, which this module does not import) tells
    which handler ``finish_request`` made."""
    if server.socket_type == socket.SOCK_DGRAM:
        return AsyncDatagramServing(server, made_by)
    return AsyncServing(server, made_by)


@implementer(IServing)
class AsyncServing:
    """The serving of a stream server with an async handler class: the
    reactor takes its connections and runs their handlers' coroutines.

    Args:
        server: a ``TCPServer`` (or subclass) whose ``RequestHandlerClass``
            is an async handler class.
    """

    # A request's handling ends when its handler's coroutines have, after
    # process_request returned: the strategy then ends it (handler_ended).
    server_settings: dict[str, Any] = {"_requests_finish_elsewhere": True}
    # An ssl: description's TLS is Twisted's, on the reactor.
    tls_in_request = False
    #: Told when the acceptor starts watching the server's socket
    #: (``watching(fd)``) and each time it is woken (``woken(fd)``): a
    #: ``--workers`` worker sets it for a socket it shares with the other
    #: workers (``_workers.exclusive_accept``).
    accept_sharing: Any = None

    def __init__(self, server: Any, made_by: Callable[..., Any]) -> None:
        self.server = server
        self._made_by = made_by
        self.reactor = _reactor.get_reactor()
        self.factory = ConnectionFactory(self)
        self.family = server.address_family
        self._unix = self.family == getattr(socket, "AF_UNIX", None)
        self.port: Any = None  # an endpoint's listening port
        self.connections: set[Connection] = set()
        self.tasks: set[HandlerTask] = set()
        self._acceptor: _SocketAcceptor | None = None
        self._notify: Callable[[str], None] | None = None
        self._budget: int | None = None  # requests still to take; None: any number
        self._serving = False
        self._reading = False
        self._pool: ThreadPool | None = None
        self._closed = False
        # Reads accepted connections once there are many (None: none can be).
        self._multiplexer: ReadMultiplexer | None = None
        self._multiplexer_made = False

    # -- the serving loop's side (serving thread) -------------------------------------------

    def readiness(self, server: Any, once: bool) -> AsyncReadiness:
        """While a serving call lasts, the reactor accepts (*once*: one request)."""
        return AsyncReadiness(self, 1 if once else None)

    def take_request(self, server: Any) -> None:
        """Nothing: the reactor has taken the request already."""

    def endpoint_listener(self, endpoint: Any, *, backlog: int, server: Any) -> Any:
        """An endpoint's port feeding this serving's factory."""
        return AsyncEndpointListener(endpoint, backlog=backlog, server=server, serving=self)

    # -- accepting --------------------------------------------------------------------------

    def start_accepting(self, budget: int | None, notify: Callable[[str], None]) -> None:
        self._budget = budget
        self._notify = notify
        self._serving = True
        self.update_accepting()

    def stop_accepting(self) -> None:
        self._serving = False
        self._notify = None
        self.update_accepting()

    def _active(self) -> int:
        """What ``max_connections`` counts."""
        return len(self.connections)

    def update_accepting(self) -> None:
        """Accept while serving, under ``max_connections``, within the budget."""
        limit = self.server.max_connections
        want = (
            self._serving
            and not self._closed
            and self._budget != 0
            and (limit is None or self._active() < limit)
        )
        if self.port is not None:
            if want != self._reading:
                self._reading = want
                _set_reading(self.port, want)
            return
        sock = self.server.socket
        if sock is None or sock.fileno() == -1:
            return
        if self._acceptor is None:
            self._acceptor = _SocketAcceptor(self, sock)
        if want:
            self._acceptor.arm()
        else:
            self._acceptor.disarm()

    def accepted(self, request: Any, client_address: Any) -> None:
        """A request that ``get_request()`` returned from the server's own socket."""
        if type(client_address) is tuple and type(client_address[0]) is str:
            # Every accept makes its own copy of the client's host string:
            # one shared copy per host instead (58 bytes of every IPv4
            # connection, more for IPv6, kept as long as the connection).
            client_address = (sys.intern(client_address[0]), *client_address[1:])
        try:
            self._adopt(request, client_address)
        except Exception:
            request.close()
            self.server.handle_error(request, client_address)

    def _adopt(self, sock: socket.socket, client_address: Any) -> None:
        """Make a Twisted transport of an accepted socket (see ``adopted_transport``)."""
        protocol = Connection(self, client_address, sock)
        protocol.factory = self.factory
        multiplexer = None
        if len(self.connections) >= MULTIPLEX_AT:
            if not self._multiplexer_made:
                self._multiplexer_made = True
                self._multiplexer = ReadMultiplexer.for_reactor(self.reactor)
            multiplexer = self._multiplexer
        transport = adopted_transport(
            sock,
            protocol,
            client_address,
            # Twisted's session number only goes into the log prefix and
            # repr, which adopted transports share: no int per connection.
            0,
            self.reactor,
            unix=self._unix,
            multiplexer=multiplexer,
        )
        protocol.makeConnection(transport)

    def _consume_budget(self) -> None:
        if self._budget is not None:
            self._budget -= 1
            if self._budget == 0:
                self.update_accepting()
                if self._notify is not None:
                    self._notify(_READY)

    # -- connections and requests -----------------------------------------------------------

    def connection_started(self, connection: Connection) -> None:
        self.connections.add(connection)
        idle = self.server.idle_timeout
        if idle is not None:
            connection.last_activity = time.monotonic()
            connection.idle_timer = self.reactor.callLater(idle, self._check_idle, connection)
        elif connection.record is None:
            connection.plain = True
        self._consume_budget()
        # Only a cap makes the number of connections matter for accepting.
        if self.server.max_connections is not None:
            self.update_accepting()
        self.run_request(connection.request, connection.client_address, connection.record)
        if connection.task is None:
            # Refused, or process_request failed: no handler runs.
            connection.ended()

    def connection_lost(self, connection: Connection) -> None:
        self.connections.discard(connection)
        if self.server.max_connections is not None:
            self.update_accepting()

    def _check_idle(self, connection: Connection) -> None:
        if connection.lost:
            return
        idle = self.server.idle_timeout or 0.0
        quiet = time.monotonic() - connection.last_activity
        if quiet < idle:
            connection.idle_timer = self.reactor.callLater(
                idle - quiet, self._check_idle, connection
            )
            return
        connection.idle_timer = None
        if connection.record is not None:
            lifecycle.timed_out(connection.record)
        log_warning(
            "%s: closing the connection from %r: no progress either way for %.1f s (idle_timeout)",
            type(self.server).__name__,
            connection.client_address,
            quiet,
        )
        if connection.writer is not None and connection.writer.paused:
            # Bytes the client does not read would hold a clean close open.
            connection.transport.abortConnection()
        else:
            connection.transport.loseConnection()

    def run_request(self, request: Any, client_address: Any, record: Any = None) -> None:
        """Run the request through the server's lifecycle
        (``BaseServer._serve_request``), as the serving thread would.

        *record*: its lifecycle record, if observed.  A ``verify_request``
        that raises goes to ``handle_error`` here (on the serving thread it
        would leave ``serve_forever``; nothing above the reactor would see it).
        """
        server = self.server
        try:
            server._serve_request(request, client_address, record)
        except Exception:
            if record is not None:
                lifecycle.failed(record)
            server.handle_error(request, client_address)
            server.shutdown_request(request)
            if record is not None:
                lifecycle.ended(record)

    def process_request(self, server: Any, request: Any, client_address: Any) -> None:
        """Make the handler (``finish_request``) and start its coroutine."""
        handler = self._made_by(server.finish_request, request, client_address)
        if handler is None:
            raise TypeError(
                f"{type(server).__name__}.finish_request() made no async request handler "
                "(an instance of txsocketserver.AsyncBaseRequestHandler)"
            )
        connection = getattr(request, "_connection", None)
        task = HandlerTask(
            handler,
            owner=self,
            reactor=self.reactor,
            writer=None if connection is None else connection.writer,
        )
        self.tasks.add(task)
        if connection is not None:
            connection.task = task
        task.start()

    def handler_failed(self, task: HandlerTask) -> None:
        """The handler raised (inside the ``except``: the exception is current)."""
        request = task.handler.request
        self.server._request_failed(request)
        self.server.handle_error(request, task.handler.client_address)

    def handler_ended(self, task: HandlerTask) -> None:
        """The handler's coroutines have ended: so has the request's handling."""
        request = task.handler.request
        server = self.server
        try:
            server.shutdown_request(request)
        except Exception:
            server._request_failed(request)
            server.handle_error(request, getattr(request, "_peer", None))
        finally:
            server._request_finished(request)
            self.tasks.discard(task)
            self._request_over(request)

    def _request_over(self, request: Any) -> None:
        connection = getattr(request, "_connection", None)
        if connection is not None:
            connection.ended()

    # -- to_thread --------------------------------------------------------------------------

    def to_thread(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Run ``function(*args, **kwargs)`` on the server's own pool (reactor thread)."""
        if self._pool is None:
            if self._closed:
                raise RuntimeError("the server is closed")
            size = getattr(self.server, "max_threads", None) or DEFAULT_TO_THREAD_MAX
            pool = ThreadPool(0, size, name=f"{type(self.server).__name__}-to_thread")
            pool.threadFactory = DaemonThread
            pool.start()
            self._pool = pool
        return deferToThreadPool(self.reactor, self._pool, function, *args, **kwargs)

    # -- closing ----------------------------------------------------------------------------

    def call_soon(self, function: Callable[..., object], *args: Any) -> None:
        _reactor.call_soon(function, *args)

    def close(self) -> None:
        """Stop accepting, cancel the handlers still running, wait for them.

        Any thread.  Off the reactor thread it waits (at most
        ``CLOSE_TIMEOUT`` seconds) until the handlers have ended (``finish()``
        included) and their connections have sent what was written and closed.
        """
        if self._closed:
            return
        self._closed = True
        reactor = self.reactor
        if not reactor.running:
            self._retire_multiplexer()
            self._stop_pool()
            _reactor.release(self)
            return
        done = threading.Event()

        def cancel_all() -> None:
            self.update_accepting()
            self._retire_multiplexer()
            for task in list(self.tasks):
                task.cancel()
            self._when_idle(done.set)

        if _reactor.in_reactor_thread():
            cancel_all()
        else:
            reactor.callFromThread(cancel_all)
            done.wait(CLOSE_TIMEOUT)
        self._stop_pool()
        _reactor.release(self)

    def _retire_multiplexer(self) -> None:
        if self._multiplexer is not None:
            self._multiplexer.retire()

    def _when_idle(self, callback: Callable[[], None]) -> None:
        if not self.tasks and not self.connections:
            callback()
            return
        self.reactor.callLater(0.01, self._when_idle, callback)

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            threading.Thread(
                target=pool.stop, name="txsocketserver-to_thread-stop", daemon=True
            ).start()


class AsyncDatagramServing(AsyncServing):
    """The serving of a datagram server with an async handler class: the
    reactor reads each datagram (``get_request()``) and runs its handler."""

    def _active(self) -> int:
        return len(self.tasks)

    def accepted(self, request: Any, client_address: Any) -> None:
        """A datagram that ``get_request()`` read."""
        self._consume_budget()
        server = self.server
        record = server._accepted_record(request, client_address) if server._observers else None
        self.run_request(request, client_address, record)

    def _request_over(self, request: Any) -> None:
        # One handler fewer: under max_connections, reading may resume.
        self.update_accepting()


@implementer(IRequestReadiness)
class AsyncReadiness:
    """The serving loop of an async server: the reactor takes the requests.

    While it exists the reactor accepts and runs requests itself; ``wait()``
    only sleeps until ``shutdown()`` wakes it (or, for ``handle_request()``,
    until the one request has been taken), so that ``service_actions()`` and
    ``shutdown()`` keep their meaning.
    """

    def __init__(self, serving: AsyncServing, budget: int | None) -> None:
        self._serving = serving
        self._tokens: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._closed = False
        # The server's async strategy holds the reactor until it is closed.
        _reactor.hold(serving)
        _reactor.call_in_reactor(serving.start_accepting, budget, self._tokens.put)

    def wait(self, timeout: float | None) -> bool:
        try:
            return self._tokens.get(timeout=timeout) == _READY
        except queue.Empty:
            return False

    def wake(self) -> None:
        self._tokens.put(_WAKE)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _reactor.call_in_reactor(self._serving.stop_accepting)
