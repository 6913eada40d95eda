# -*- test-case-name: tests.test_forking,tests.test_forking_fidelity -*-
"""``ForkingMixIn``: every request in a process of its own.

The mixin keeps the stdlib's public shape (``max_children``,
``active_children``, ``collect_children``, ``block_on_close``...) and hands
each request to its dispatcher (``IProcessDispatcher``, in ``_forking.dispatcher``),
which runs it in a worker process forked from a template that Twisted's
``spawnProcess`` started: the server process, which runs threads, is never
forked.  ``docs/architecture.md`` tells the path of a request, and
``docs/forking.md`` what the request's process sees.  This module is part of
the Twisted-free core: the template imports it with the server class.
"""

from __future__ import annotations

import os

from txsocketserver._core import lifecycle
from txsocketserver._core.base import run_request
from txsocketserver._forking.template import flush_stdio

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from txsocketserver._core.base import IProcessDispatcher


class ForkingMixIn:
    """Mix-in class to handle each request in a new process.

    The request runs in a worker process forked from a template process that
    Twisted's ``spawnProcess`` started, not from the server process itself: see
    ``docs/forking.md`` for what the worker sees (module state as imported, a
    copy of the server's picklable attributes) and what that changes.

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
    # Pids of the worker processes running now; None until the first request.
    active_children: set[int] | None = None
    # At most this many requests run at once; the next waits for one to end.
    max_children = 40
    # Whether server_close() waits until all child processes complete.
    block_on_close = True
    # Ours: worker processes kept forked and waiting, so that a request does
    # not wait for a fork (at most max_children; read when serving starts).
    warm_children = 2

    _forking_dispatcher: IProcessDispatcher | None = None
    # The serving process's own: a forked request's server has none.
    _serving_process_only: tuple[str, ...] = ("_forking_dispatcher",)

    def collect_children(self, *, blocking: bool = False) -> None:
        """Forget the children that have exited.

        Waits while ``max_children`` are running, and with *blocking* until all
        have exited.  The workers are reaped by their template process, so this
        never reaps a process the server did not start.
        """
        if self.active_children is None:
            return
        workers = self._forking_dispatcher
        if workers is not None:
            workers.wait_below(self.max_children)
            if blocking:
                workers.wait_idle(None)
        self._update_active_children()
        self._report_exits()

    def _report_exits(self) -> None:
        """End the lifecycle records of the requests whose child has exited."""
        workers = self._forking_dispatcher
        if workers is None:
            return
        for record, code in workers.take_exits():
            if record.details is None:
                record.details = {}
            record.details["exit_code"] = code
            lifecycle.ended(record, None if code == 0 else lifecycle.ERROR)

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
        a worker, the next ones in the kernel backlog).

        Error handling:
            ``TypeError`` if the request cannot be handed over (a socket that
            ``get_request`` wrapped in TLS); the serving loop then calls
            ``handle_error`` and ``shutdown_request``, as for any failure here.
        """
        workers = self._forking_workers()
        if self.active_children is None:
            self.active_children = set()
        limit = self.max_children
        if self.max_connections is not None:  # type: ignore[attr-defined]
            limit = min(limit, self.max_connections)  # type: ignore[attr-defined]
        workers.wait_below(limit)
        tag = workers.dispatch(self._process_request_in_child, request, client_address)
        record = self._take_record(request)  # type: ignore[attr-defined]
        if record is not None:
            # Its end is the child's exit, which the template reports.
            workers.report_exit(tag, record)
        self.close_request(request)  # type: ignore[attr-defined]

    def _process_request_in_child(self, request: Any, client_address: Any) -> None:
        """The stdlib's child: runs in the worker, and never returns."""
        succeeded = False
        try:
            succeeded = run_request(self, request, client_address)
        finally:
            flush_stdio()
            os._exit(0 if succeeded else 1)

    def server_close(self) -> None:
        """Close the socket, then wait for the children (``block_on_close``) and
        stop the template process."""
        super().server_close()  # type: ignore[misc]
        self.collect_children(blocking=self.block_on_close)
        self._report_exits()
        workers, self._forking_dispatcher = self._forking_dispatcher, None
        if workers is not None:
            workers.close(wait=self.block_on_close)
            for record, code in workers.take_exits(everything=True):
                lifecycle.ended(record, None if code == 0 else lifecycle.ERROR)

    def _forking_workers(self) -> IProcessDispatcher:
        if self._forking_dispatcher is None:
            from txsocketserver._forking.dispatcher import ProcessDispatcher

            # Read here, when serving starts.
            warm = max(1, min(self.warm_children, self.max_children))
            self._forking_dispatcher = ProcessDispatcher(warm=warm)
        return self._forking_dispatcher

    def _update_active_children(self) -> None:
        workers = self._forking_dispatcher
        pids = workers.running_pids() if workers is not None else set()
        active = self.active_children
        if active is not None:
            active.intersection_update(pids)
            active.update(pids)

    def _request_readiness(self, once: bool = False) -> Any:
        # Serving begins: refuse classes that cannot be carried to a worker,
        # and start the template now rather than on the first request.
        self._forking_workers().warm_up(self)
        return super()._request_readiness(once)  # type: ignore[misc]

    def _after_serving_step(self) -> None:
        super()._after_serving_step()  # type: ignore[misc]
        if self._forking_dispatcher is not None:
            self._forking_dispatcher.upkeep()
