# -*- test-case-name: tests.test_layout -*-
"""The roles behind the socketserver classes, as ``zope.interface`` interfaces.

Which roles there are, which strategies fill each and when a server picks
them is told once, in ``docs/architecture.md`` ("The roles").  The
Twisted-free strategies cannot import ``zope.interface`` and declare nothing;
``tests/test_layout.py`` verifies every strategy, declared or not, against
its role.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from zope.interface import Attribute, Interface


class IRequestReadiness(Interface):
    """Tells a serving thread when ``get_request()`` will not block."""

    def wait(timeout: float | None) -> bool:
        """Block the serving thread until a request is ready, ``wake()`` is
        called, or *timeout* seconds pass (``None``: no limit).  Returns whether
        a request is ready."""

    def wake() -> None:
        """Make a current or the next ``wait()`` return ``False`` at once.
        Callable from any thread."""

    def close() -> None:
        """Stop watching.  Called once, from the serving thread."""


class IListener(Interface):
    """How a stream server gets its connections; the server's hooks call it.

    A listener serves one server, whose attributes (``socket``,
    ``server_address``, ``allow_reuse_address``, ``request_queue_size``...)
    keep their stdlib meaning and are read when used, so that a subclass
    overriding a hook can still do the stdlib's work itself.
    """

    stops_at_once = Attribute(
        "Whether stop_accepting() may run while the serving loop waits on this "
        "listener.  A socket must wait for the loop to leave it first."
    )

    def bind() -> None:
        """``server_bind``: bind (or listen on the endpoint); set ``server_address``."""

    def activate() -> None:
        """``server_activate``: start listening."""

    def accept() -> tuple[Any, Any]:
        """``get_request``: the next ``(request, client_address)``; called when
        the readiness said one is waiting.

        Error handling: ``OSError`` as ``socket.accept`` raises it (``EBADF``
        once closed, ``EMFILE``...)."""

    def fileno() -> int:
        """``fileno``: a descriptor that is readable while a connection waits."""

    def readiness() -> IRequestReadiness:
        """A readiness for one serving call (``serve_forever``, ``handle_request``)."""

    def start_listening() -> Any:
        """For ``start_server``: a Deferred that fires once a server made with
        ``bind_and_activate=False`` listens, or ``None`` if it listens already
        or its caller binds it (a plain socket address).  Reactor thread."""

    def stop_accepting() -> None:
        """Refuse new connections; the requests in flight go on, and so do the
        connections accepted already that wait for a handler (see
        :meth:`wait_accepted_taken`).  Any thread."""

    def wait_accepted_taken(timeout: float) -> bool:
        """After :meth:`stop_accepting`: wait until no connection this
        listener accepted waits for a handler (queued for ``get_request``, or
        reading its PROXY header), so that a stop serves every connection
        accepted before it; whether that happened within *timeout* seconds.
        Any thread but the serving thread, whose loop takes them."""

    def close() -> None:
        """``server_close``: stop listening and release everything."""


class IConnectionSecurity(Interface):
    """What a stream connection needs around its handler (TLS, or nothing)."""

    def wrap(request: Any) -> Any:
        """The accepted socket as the handler will see it; no I/O.  In
        ``get_request``, serving thread."""

    def establish(request: Any, handler_class: Any) -> bool:
        """Get the connection ready before *handler_class* is made (the TLS
        handshake, bounded by the class's ``timeout``), in the thread that
        runs the request.  ``False``: the client left or stalled, which is
        nobody's error; skip the handler."""

    def end(request: Any) -> None:
        """Say goodbye before the connection is shut down (``close_notify``)."""


class IRequestDispatcher(Interface):
    """Runs requests somewhere other than the serving thread."""

    def dispatch(function: Callable[..., object], *args: Any) -> Any:
        """Start ``function(*args)`` (a server's ``process_request_thread`` or
        equivalent) and return without waiting for it: ``None``, or what names
        the request to the dispatcher afterwards (a process dispatcher's tag)."""

    def upkeep() -> None:
        """Periodic housekeeping, called from the serving loop (cheap when there
        is nothing to do)."""

    def close(wait: bool) -> None:
        """Release the dispatcher's resources; with *wait*, first let the
        requests in flight finish."""


class IThreadDispatcher(IRequestDispatcher):
    """Runs each request on a pool thread (``ThreadingMixIn``'s strategy)."""

    request_threads = Attribute(
        "The threads running requests now, as the stdlib's _threads: a list "
        "whose join() waits for them and whose reap() forgets the ended ones."
    )

    def counts() -> tuple[int, int, int]:
        """``(busy, idle, waiting)``: threads running a request, threads
        waiting for one, requests waiting for a thread."""


class IProcessDispatcher(IRequestDispatcher):
    """Runs each request in a child process (``ForkingMixIn``'s strategies)."""

    def warm_up(server: Any) -> None:
        """Serving starts: check that the server's and the handler's classes
        can be carried to a child (``TypeError`` saying why not), and start
        what forks the children now rather than at the first request."""

    def wait_below(limit: int) -> None:
        """Block until fewer than *limit* requests run (``max_children``)."""

    def wait_idle(timeout: float | None) -> bool:
        """Block until no request runs; whether that happened in time."""

    def running_pids() -> set[int]:
        """The pids of the children running requests now (``active_children``)."""

    def report_exit(tag: int, what: Any) -> None:
        """Have ``take_exits`` return *what* once the request that
        ``dispatch`` returned *tag* for has ended (its child exited)."""

    def take_exits(everything: bool = False) -> list[tuple[Any, int | None]]:
        """``(what, exit code)`` of the requests given to ``report_exit`` that
        have ended since the last call (``None``: the template died first);
        with *everything*, those still running too."""


class IServing(Interface):
    """Who takes a stream server's requests and runs them.

    Chosen with the listener and the connection security when the server is
    made (``_twisted.strategies.strategies_for``), from the handler class:
    ``ServingThread`` (``_core.stream``) for a plain handler class, the
    serving thread taking each request through ``BaseServer``'s template
    method; ``AsyncServing`` (``_async.serving``) for an async one, the
    reactor taking them and running the handlers' coroutines.  Every request
    goes through ``BaseServer._serve_request`` either way.  The server's
    hooks delegate to it and test no mode.
    """

    server_settings = Attribute(
        "A dict of the server attributes this serving sets when the server is made."
    )
    tls_in_request = Attribute(
        "Whether an ssl: description's TLS is done in the request's thread "
        "(Python's ssl) rather than by Twisted."
    )

    def readiness(server: Any, once: bool) -> IRequestReadiness:
        """For a serving call (*once*: ``handle_request``): what its loop waits on."""

    def take_request(server: Any) -> None:
        """A request is ready: take it (``_handle_request_noblock``)."""

    def process_request(server: Any, request: Any, client_address: Any) -> None:
        """``TCPServer.process_request``: run the request (inline, or start
        its handler's coroutines)."""

    def endpoint_listener(endpoint: Any, *, backlog: int, server: Any) -> IListener:
        """The listener for an endpoint that Twisted must accept on."""

    def to_thread(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A Deferred of ``function(*args, **kwargs)`` run on the server's own
        pool (``TypeError`` for a plain handler class)."""

    def close() -> None:
        """The server closes: stop, and cancel what still runs."""


class IServerControl(Interface):
    """What a service asks of a server beyond the socketserver API.

    ``BaseServer`` provides it: a server class of the user's, derived from
    any of ours, needs nothing more to run as a service.
    """

    def _start_listening() -> Any:
        """As :meth:`IListener.start_listening`; reactor thread."""

    def _stop_accepting() -> None:
        """Refuse new requests; those in flight go on.  Any thread."""

    def _wait_accepted_taken(timeout: float) -> bool:
        """As :meth:`IListener.wait_accepted_taken`."""

    _stops_accepting_at_once = Attribute(
        "Whether _stop_accepting() may run while the serving loop is still waiting."
    )

    def _requests_in_flight() -> list[Any]:
        """The requests between ``verify_request`` and the end of their handling."""

    def _wait_for_requests(timeout: float | None) -> bool:
        """Wait until no request is in flight; whether that happened in time."""

    def _log_errors_to(logger: Any) -> None:
        """Send ``handle_error`` to a ``twisted.logger.Logger`` (``None``: stderr)."""
