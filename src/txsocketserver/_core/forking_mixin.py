# -*- test-case-name: tests.test_forking,tests.test_forking_server_fork -*-
"""``ForkingMixIn``: every request in a process of its own.

The mixin keeps the stdlib's public shape (``max_children``,
``active_children``, ``collect_children``, ``block_on_close``...) and hands
each request to its dispatcher (``IProcessDispatcher``), chosen by
``fork_from`` when serving starts: ``_forking.dispatcher`` runs it in a
child forked from a template process that Twisted's ``spawnProcess`` started
(the default: the server process, which runs threads, is never forked),
``_forking.server_fork`` in a child forked from the server process itself,
as the stdlib does.  ``docs/architecture.md`` tells the path of a request,
and ``docs/forking.md`` what the child sees.  This module is part of the
Twisted-free core: the template imports it with the server class.
"""

from __future__ import annotations

import os

from txsocketserver._core import lifecycle
from txsocketserver._core.base import run_request
from txsocketserver._forking import template as _template

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from txsocketserver._core.base import IProcessDispatcher

# A child's exit status after its client's TLS handshake failed (a refusal,
# not a handler error): _forking.tls.EXIT_TLS_HANDSHAKE.
EXIT_TLS_HANDSHAKE = 3

# fork_from's values.
FORK_FROM_TEMPLATE = "template"
FORK_FROM_SERVER = "server"


def _end_record(record: Any, code: int | None) -> None:
    """End the lifecycle record of a request whose child exited with *code*."""
    if code == EXIT_TLS_HANDSHAKE:
        lifecycle.refused(record, lifecycle.TLS_HANDSHAKE)
    lifecycle.ended(record, None if code == 0 else lifecycle.ERROR)


class ForkingMixIn:
    """Mix-in class to handle each request in a new process.

    By default the request runs in a child process forked from a template
    process that Twisted's ``spawnProcess`` started, not from the server
    process itself: see ``docs/forking.md`` for what the child sees (modules
    as imported, the classes' attributes as the program set them, the
    server's attributes by value or by name) and what that changes.  With
    ``fork_from = "server"`` the serving process itself forks, as the
    stdlib's does.

    Like the stdlib's, the mixin has no constructor of its own: the server
    class's ``__init__``, whatever its signature, runs untouched.

    Error handling:
        Serving (``serve_forever``, ``handle_request``) raises ``TypeError``
        when it starts if the server class or the handler class cannot be
        carried to a new process: one that a new process cannot import by
        name (defined inside a function, in ``python -c``...) is carried by
        value, and that fails if it holds something that does not pickle
        (a lock, an open file).
    """

    # Seconds handle_request() waits for a request before collecting children.
    timeout: float | None = 300
    # Pids of the child processes running now; None until the first request.
    active_children: set[int] | None = None
    # At most this many requests run at once; the next waits for one to end.
    max_children = 40
    # Whether server_close() waits until all child processes complete.
    block_on_close = True
    # Ours: child processes kept forked and waiting, so that a request does
    # not wait for a fork (at most max_children; read when serving starts).
    # The template forks replacements once half are taken, in a row, which
    # costs it fewer page copies than one fork at a time (docs/forking.md).
    warm_children = 4
    # Ours: what each request's process is forked from (read when serving
    # starts): "template", a process started for the purpose, which has no
    # thread (docs/forking.md); or "server", the serving process itself,
    # as the stdlib does, for state that cannot reach a template.
    fork_from = FORK_FROM_TEMPLATE

    _forking_dispatcher: IProcessDispatcher | None = None
    # The serving process's own: a forked request's server has none.  A TLS
    # server's connection security reaches the child as the TLS the child
    # does the handshake with (its for_child(), _forking.tls), no other.
    _serving_process_only: tuple[str, ...] = ("_forking_dispatcher", "_security")

    def collect_children(self, *, blocking: bool = False) -> None:
        """Forget the children that have exited.

        Waits while ``max_children`` are running, and with *blocking* until all
        have exited.  Children are reaped by pid (by their template process,
        by default), so this never reaps a process the server did not start.
        """
        if self.active_children is None:
            return
        dispatcher = self._forking_dispatcher
        if dispatcher is not None:
            dispatcher.wait_below(self.max_children)
            if blocking:
                dispatcher.wait_idle(None)
        self._update_active_children()
        self._report_exits()

    def _report_exits(self) -> None:
        """End the lifecycle records of the requests whose child has exited."""
        dispatcher = self._forking_dispatcher
        if dispatcher is None:
            return
        for record, code in dispatcher.take_exits():
            if record.details is None:
                record.details = {}
            record.details["exit_code"] = code
            _end_record(record, code)

    def handle_timeout(self) -> None:
        """Wait for zombies after self.timeout seconds of inactivity.

        May be extended, do not override.
        """
        self.collect_children()

    def service_actions(self) -> None:
        """Collect the exited child processes regularly (``serve_forever`` calls
        this once per loop)."""
        self.collect_children()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Run the request in a new process, then close the parent's copy of it.

        Waits first while ``max_children`` requests are running (or
        ``max_connections``, if lower: the connection just accepted waits for
        a child, the next ones in the kernel backlog).

        Error handling:
            ``TypeError`` if the request cannot be handed over (a socket that
            ``get_request`` wrapped in TLS); the serving loop then calls
            ``handle_error`` and ``shutdown_request``, as for any failure here.
        """
        dispatcher = self._process_dispatcher()
        if self.active_children is None:
            self.active_children = set()
        limit = self.max_children
        if self.max_connections is not None:  # type: ignore[attr-defined]
            limit = min(limit, self.max_connections)  # type: ignore[attr-defined]
        dispatcher.wait_below(limit)
        tag = dispatcher.dispatch(self._process_request_in_child, request, client_address)
        record = self._take_record(request)  # type: ignore[attr-defined]
        if record is not None:
            # Its end is the child's exit, which the dispatcher reports.
            dispatcher.report_exit(tag, record)
        self.close_request(request)  # type: ignore[attr-defined]

    def _process_request_in_child(self, request: Any, client_address: Any) -> None:
        """The stdlib's child: runs in the child, and never returns."""
        succeeded = False
        try:
            succeeded = run_request(self, request, client_address)
        finally:
            _template.flush_stdio()
            # An ssl: server's child says a failed handshake by its exit status.
            exit_status = getattr(getattr(self, "_security", None), "exit_status", None)
            os._exit(exit_status(succeeded) if exit_status else 0 if succeeded else 1)

    def server_close(self) -> None:
        """Close the socket, then wait for the children (``block_on_close``) and
        stop the template process."""
        super().server_close()  # type: ignore[misc]
        self.collect_children(blocking=self.block_on_close)
        self._report_exits()
        dispatcher, self._forking_dispatcher = self._forking_dispatcher, None
        if dispatcher is not None:
            dispatcher.close(wait=self.block_on_close)
            for record, code in dispatcher.take_exits(everything=True):
                _end_record(record, code)

    def _process_dispatcher(self) -> IProcessDispatcher:
        if self._forking_dispatcher is None:
            if _template.importing_main:
                # Multiprocessing's spawn refuses the same, for the same reason.
                raise RuntimeError(
                    "a forking server started serving while its template process "
                    "was running the main script again to find an object by name: "
                    "the script starts serving when it is imported, which would "
                    'start one template after another. Start it under an "if __name__ '
                    "== '__main__':\" guard."
                )
            # Read here, when serving starts.
            if self.fork_from == FORK_FROM_SERVER:
                from txsocketserver._forking.server_fork import ServerForkDispatcher

                self._forking_dispatcher = ServerForkDispatcher()
            elif self.fork_from == FORK_FROM_TEMPLATE:
                from txsocketserver._forking.dispatcher import ProcessDispatcher

                warm = max(1, min(self.warm_children, self.max_children))
                self._forking_dispatcher = ProcessDispatcher(warm=warm)
            else:
                raise ValueError(
                    f"fork_from must be {FORK_FROM_TEMPLATE!r} or {FORK_FROM_SERVER!r}, "
                    f"not {self.fork_from!r}"
                )
        return self._forking_dispatcher

    def _update_active_children(self) -> None:
        dispatcher = self._forking_dispatcher
        pids = dispatcher.running_pids() if dispatcher is not None else set()
        active = self.active_children
        if active is not None:
            active.intersection_update(pids)
            active.update(pids)

    def _request_readiness(self, once: bool = False) -> Any:
        # Serving begins: refuse classes that cannot be carried to a child,
        # and start the template now rather than on the first request.
        self._process_dispatcher().warm_up(self)
        return super()._request_readiness(once)  # type: ignore[misc]

    def _after_serving_step(self) -> None:
        super()._after_serving_step()  # type: ignore[misc]
        if self._forking_dispatcher is not None:
            self._forking_dispatcher.upkeep()
