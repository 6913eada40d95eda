# -*- test-case-name: tests.test_stream_threading,tests.test_threading_fidelity -*-
"""``ThreadDispatcher``: the requests of a ``ThreadingMixIn`` server on a Twisted ``ThreadPool``.

Imported by ``ThreadingMixIn`` when its server first dispatches a request
(see ``_twisted.interfaces``): merely defining a threading server class imports no
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

from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.interfaces import IThreadDispatcher


class DaemonThread(threading.Thread):
    """A pool thread that never holds up interpreter exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, daemon=True, **kwargs)


class RequestThreads(list):  # type: ignore[type-arg]
    """The threads running a request of one server now: ``ThreadingMixIn._threads``.

    The stdlib's ``_Threads`` lists each request's thread from its start
    until the next request reaps it once it has ended; ours are pool threads
    that outlive their requests, so a thread is listed while it runs a
    request, and leaves the list as the request ends (its thread having
    reported any exception to ``threading.excepthook``).  ``join()`` waits
    until the requests listed now have ended, as the stdlib's joins their
    threads.
    """

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition(threading.Lock())

    def entered(self, thread: threading.Thread) -> None:
        with self._changed:
            self.append(thread)

    def left(self, thread: threading.Thread) -> None:
        with self._changed:
            self.remove(thread)
            self._changed.notify_all()

    def reap(self) -> None:
        """Nothing to do: threads leave the list as their requests end."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no request is running; return whether that happened in time."""
        with self._changed:
            return self._changed.wait_for(lambda: not self, timeout)


def report_to_excepthook(thread: threading.Thread) -> None:
    """Hand the exception being handled to ``threading.excepthook``, with the
    ``ExceptHookArgs`` a thread gets when its target raises; an exception
    from the hook itself goes to ``sys.excepthook``, as in ``threading``."""
    exc_type, exc_value, exc_traceback = sys.exc_info()
    try:
        threading.excepthook(
            threading.ExceptHookArgs([exc_type, exc_value, exc_traceback, thread])  # type: ignore[call-arg]
        )
    except Exception:
        print("Exception in threading.excepthook:", file=sys.stderr, flush=True)
        sys.excepthook(*sys.exc_info())
    finally:
        del exc_type, exc_value, exc_traceback


@implementer(IThreadDispatcher)
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
        self._pool.threadFactory = DaemonThread
        self._pool.start()
        self._idle_timeout = idle_thread_timeout
        self._next_trim = time.monotonic() + idle_thread_timeout
        self._idle_at_last_trim = 0
        self._hold_exit = hold_exit
        self.request_threads = RequestThreads()
        # Requests on an endpoint's connections need the reactor until they end.
        _reactor.hold(self)

    def dispatch(self, function: Callable[..., object], *args: Any) -> None:
        self._pool.callInThread(self._run, function, args)

    def _run(self, function: Callable[..., object], args: tuple[Any, ...]) -> None:
        # What escapes the request reaches threading.excepthook as from any
        # thread's target (not Twisted's log), and the pool thread lives on.
        thread = threading.current_thread()
        self.request_threads.entered(thread)
        try:
            function(*args)
        except BaseException:
            report_to_excepthook(thread)
        finally:
            self.request_threads.left(thread)

    def counts(self) -> tuple[int, int, int]:
        from txsocketserver._twisted import compat

        return compat.thread_pool_counts(self._pool)

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
            self._stop_pool()
        else:
            # stop() joins the pool's threads; let a helper do the joining so
            # the threads still end once their requests are done.  Like the
            # request threads, it holds up exit only for non-daemon requests.
            threading.Thread(
                target=self._stop_pool,
                name="txsocketserver-pool-stop",
                daemon=not self._hold_exit,
            ).start()
        _reactor.release(self)

    def _stop_pool(self) -> None:
        self._pool.stop()
        # The pool keeps its ended threads listed, in reference cycles that
        # only the collector frees: until then threading._dangling counts
        # them, where Python 3.10's threading_cleanup looks.
        self._pool.threads.clear()
