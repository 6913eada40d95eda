"""``ThreadDispatcher``: the requests of a ``ThreadingMixIn`` server on a Twisted ``ThreadPool``.

Imported by ``ThreadingMixIn`` when its server first dispatches a request
(see ``_dispatch``): merely defining a threading server class imports no
Twisted.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from txsocketserver._twisted.interfaces import IRequestDispatcher


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


@implementer(IRequestDispatcher)
class ThreadDispatcher:
    """Runs requests on a private Twisted ``ThreadPool``.

    Args:
        name: names the pool's threads, for debuggers and logs.
        max_threads: at most this many requests run at once; ``None`` means no
            limit, as in the stdlib.
        idle_thread_timeout: seconds a thread may stay idle before it is retired.
        hold_exit: whether stopping the pool may hold up interpreter exit
            (the stdlib's non-daemon request threads).
    """

    def __init__(
        self,
        *,
        name: str,
        max_threads: int | None,
        idle_thread_timeout: float,
        hold_exit: bool,
    ) -> None:
        self._pool = ThreadPool(0, max_threads or sys.maxsize, name=name)
        self._pool.threadFactory = _daemon_thread
        self._pool.start()
        self._idle_timeout = idle_thread_timeout
        self._next_trim = time.monotonic() + idle_thread_timeout
        self._idle_at_last_trim = 0
        self._hold_exit = hold_exit

    def dispatch(self, function: Callable[..., object], *args: Any) -> None:
        self._pool.callInThread(function, *args)

    def upkeep(self) -> None:
        now = time.monotonic()
        if now < self._next_trim:
            return
        self._next_trim = now + self._idle_timeout
        # A thread idle at both of two checks one period apart has been idle
        # (at least mostly) for the whole period: retire that many.
        idle_now = len(self._pool.waiters)
        for _ in range(min(idle_now, self._idle_at_last_trim)):
            self._pool.stopAWorker()
        self._idle_at_last_trim = len(self._pool.waiters)
        self._pool.threads[:] = [t for t in self._pool.threads if t.is_alive()]

    def close(self, wait: bool) -> None:
        if wait:
            self._pool.stop()
        else:
            # stop() joins the pool's threads; let a helper do the joining so
            # the threads still end once their requests are done.  Like the
            # request threads, it holds up exit only for non-daemon requests.
            threading.Thread(
                target=self._pool.stop,
                name="txsocketserver-pool-stop",
                daemon=not self._hold_exit,
            ).start()
