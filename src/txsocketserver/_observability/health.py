# -*- test-case-name: tests.test_observability -*-
"""Liveness and readiness, and the moment a stop begins.

:class:`Health` is what ``/livez`` and ``/readyz`` answer from.  It is also
the one place where *a stop has begun* is recorded: the CLI's signal handler,
a ``twistd`` shutdown and ``Workers.stopService`` call :meth:`Health.begin_stop`
first thing, before any draining.  systemd hears ``STOPPING=1`` from it (once
per process, whichever ``Health`` began the stop); whoever else must act at
that moment subscribes with :meth:`Health.when_stopping`.
"""

from __future__ import annotations

import _thread

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


class Health:
    """Whether the process is ready to serve, and whether a stop has begun.

    Ready means: every check given to :meth:`add_check` passes (each
    listener listening; with ``--workers``, every wanted worker serving) and
    no stop has begun.  Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._checks: list[Callable[[], bool]] = []
        self._stopping = False
        self._on_stop: list[Callable[[], object]] = []

    def add_check(self, check: Callable[[], bool]) -> None:
        """Make readiness also depend on ``check()`` (called per ``/readyz``)."""
        with self._lock:
            self._checks.append(check)

    @property
    def stopping(self) -> bool:
        """True once a stop has begun, for good (a stopped process exits)."""
        return self._stopping

    def ready(self) -> bool:
        """Whether ``/readyz`` answers 200 now."""
        if self._stopping:
            return False
        with self._lock:
            checks = list(self._checks)
        return all(check() for check in checks)

    def when_stopping(self, callback: Callable[[], object]) -> None:
        """Call *callback* (once) when a stop begins; at once if it has."""
        with self._lock:
            if not self._stopping:
                self._on_stop.append(callback)
                return
        callback()

    def begin_stop(self) -> bool:
        """Record that a stop begins: ``/readyz`` answers 503 from now on.

        Returns whether this call began it (False if a stop had begun).
        Callbacks registered with :meth:`when_stopping` run here, on the
        caller's thread; one that raises does not keep the others from running.
        """
        with self._lock:
            if self._stopping:
                return False
            self._stopping = True
            callbacks, self._on_stop = self._on_stop, []
        from txsocketserver._twisted import systemd

        systemd.notify_stopping()
        for callback in callbacks:
            try:
                callback()
            except Exception:
                import logging

                logging.getLogger("txsocketserver").exception("a stop callback failed")
        return True
