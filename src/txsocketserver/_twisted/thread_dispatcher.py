# -*- test-case-name: tests.test_stream_threading,tests.test_threading_fidelity -*-
"""``ThreadDispatcher``: the thread pool that runs a ``ThreadingMixIn`` server's requests.

Imported by ``ThreadingMixIn`` when its server first dispatches a request
(see ``_twisted.interfaces``): merely defining a threading server class imports no
Twisted.

A pool of our own rather than Twisted's ``ThreadPool``, for the hand-off: a
request given to an idle thread costs one lock release, which that thread
sleeps on (Twisted's goes through a coordinator, a ``Queue`` and its
``Condition``, and a logging context per call: a third of a small request's
instructions).  The pool is small enough to say whole:

* Idle threads wait each on a lock of its own, in a stack: the thread idle
  the shortest takes the next request (its stack and caches still warm),
  and the others reach ``idle_thread_timeout`` and retire themselves.
* Every thread busy: a new one starts, up to ``max_threads``; beyond it,
  requests wait in order, and a thread that ends a request takes the next.
* ``close()`` retires the idle threads and, once their requests (and those
  waiting) are done, the busy ones; with *wait*, it joins them all.
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
from collections.abc import Callable
from typing import Any

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
            if not self:
                self._changed.notify_all()  # join() waits for the list to empty

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


class _Idle:
    """An idle pool thread's place in the stack: the lock it sleeps on, and
    the request it is given (``None``: retire)."""

    __slots__ = ("wake", "work")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.work: tuple[Callable[..., object], tuple[Any, ...]] | None = None


@implementer(IThreadDispatcher)
class ThreadDispatcher:
    """Runs requests on a pool of daemon threads of its own (see the module).

    Args:
        name: names the pool's threads (``PoolThread-NAME-N``), for debuggers and logs.
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
        self._name = name
        self._max_threads = max_threads or sys.maxsize
        self._idle_timeout = idle_thread_timeout
        self._hold_exit = hold_exit
        # Guards everything below; held for a few operations, never while waiting.
        self._lock = threading.Lock()
        self._idle: list[_Idle] = []  # a stack: the last to go idle is woken first
        self._waiting: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._busy = 0
        self._threads: list[threading.Thread] = []
        self._numbers = itertools.count(1)
        self._closed = False
        self.request_threads = RequestThreads()
        # Requests on an endpoint's connections need the reactor until they end.
        _reactor.hold(self)

    def dispatch(self, function: Callable[..., object], *args: Any) -> None:
        with self._lock:
            if self._closed:
                return
            if self._idle:
                idle = self._idle.pop()
                self._busy += 1
            elif self._busy < self._max_threads:
                self._busy += 1
                idle = None
            else:
                self._waiting.append((function, args))
                return
        if idle is not None:
            idle.work = (function, args)
            idle.wake.release()
            return
        thread = DaemonThread(
            target=self._serve,
            args=(function, args),
            name=f"PoolThread-{self._name}-{next(self._numbers)}",
        )
        with self._lock:
            self._threads.append(thread)
        try:
            thread.start()
        except BaseException:
            # Out of threads (RuntimeError): the caller's handle_error says so.
            with self._lock:
                self._busy -= 1
                self._threads.remove(thread)
            raise

    def _serve(self, function: Callable[..., object], args: tuple[Any, ...]) -> None:
        """A pool thread's life: run requests until idle too long, or closed."""
        thread = threading.current_thread()
        idle = _Idle()
        work: tuple[Callable[..., object], tuple[Any, ...]] | None = (function, args)
        try:
            while work is not None:
                self._run(thread, *work)
                work = self._next_work(idle)
        finally:
            with self._lock:
                if thread in self._threads:
                    self._threads.remove(thread)

    def _next_work(self, idle: _Idle) -> tuple[Callable[..., object], tuple[Any, ...]] | None:
        """The thread's next request: one waiting, or one given while it
        sleeps idle; ``None`` to retire."""
        with self._lock:
            if self._waiting:
                return self._waiting.popleft()
            self._busy -= 1
            if self._closed:
                return None
            self._idle.append(idle)
        if not idle.wake.acquire(timeout=self._idle_timeout):
            with self._lock:
                if idle in self._idle:
                    self._idle.remove(idle)
                    return None
            # Given a request just as the timeout passed: it is on its way.
            idle.wake.acquire()
        work, idle.work = idle.work, None
        return work

    def _run(self, thread: threading.Thread, function: Callable[..., object], args: Any) -> None:
        # What escapes the request reaches threading.excepthook as from any
        # thread's target (not Twisted's log), and the pool thread lives on.
        # request_threads lists non-daemon requests only, as the stdlib's _threads.
        listed = self._hold_exit
        if listed:
            self.request_threads.entered(thread)
        try:
            function(*args)
        except BaseException:
            report_to_excepthook(thread)
        finally:
            if listed:
                self.request_threads.left(thread)

    def counts(self) -> tuple[int, int, int]:
        with self._lock:
            return (self._busy, len(self._idle), len(self._waiting))

    def upkeep(self) -> None:
        """Nothing: idle threads retire themselves after ``idle_thread_timeout``."""

    def close(self, wait: bool) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for each in idle:
            each.work = None
            each.wake.release()
        if wait:
            self._join()
        else:
            # Let a helper do the joining so the threads still end once their
            # requests are done.  Like the request threads, it holds up exit
            # only for non-daemon requests.
            threading.Thread(
                target=self._join,
                name="txsocketserver-pool-stop",
                daemon=not self._hold_exit,
            ).start()
        _reactor.release(self)

    def _join(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()
