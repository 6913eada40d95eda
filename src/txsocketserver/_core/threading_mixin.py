# -*- test-case-name: tests.test_stream_threading,tests.test_threading_fidelity -*-
"""``ThreadingMixIn``: each request on a thread of a pool (``_twisted.thread_dispatcher``).

Differences from the stdlib, all in the caller's favour:

* Threads are reused: a request starts on an idle pool thread when there is
  one, and a new thread is started only when every thread is busy, so a request
  never waits for a thread where the stdlib would have started one.
  ``max_threads`` (ours) caps the pool; requests beyond it wait in order.
* Idle threads are retired after ``idle_thread_timeout`` seconds, and all of
  them when the server closes: a burst leaves nothing behind.
* Pool threads are daemon threads so that an idle pool never holds up
  interpreter exit.  ``daemon_threads = False`` (the default) keeps its stdlib
  meaning all the same: at exit, and in ``server_close()`` when
  ``block_on_close`` is true, we wait for the requests in flight.

As in the stdlib: what escapes a request (``SystemExit``, what an overridden
``handle_error`` raises) goes to ``threading.excepthook`` with the thread that
ran it, and ``_threads`` lists the (non-daemon) threads running requests.
"""

from __future__ import annotations

import _thread
import sys
import weakref

from txsocketserver._core.base import run_request, twisted_side

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from txsocketserver._core.base import IThreadDispatcher


# Servers whose requests run on non-daemon threads in the stdlib's sense,
# keyed by id() so that a server class defining __eq__ (unhashable) works too.
_wait_at_exit: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def _wait_for_requests_at_exit() -> None:
    for server in list(_wait_at_exit.values()):
        server._wait_for_requests(None)


_registered_at_exit = False
_registering = _thread.allocate_lock()


def _register_exit_hook() -> None:
    """Make interpreter exit wait for the requests in flight (once).

    Runs when the main thread finishes, before non-daemon threads are
    joined: the moment the stdlib's non-daemon request threads would hold up
    exit.
    """
    global _registered_at_exit
    # Imported here, not with the module: a process that only defines the
    # classes (a forking server's child) must not carry threading's at-fork hook.
    import threading

    with _registering:
        if _registered_at_exit or not hasattr(threading, "_register_atexit"):
            return
        try:
            threading._register_atexit(_wait_for_requests_at_exit)
        except RuntimeError:
            # The main thread has finished already (serve_forever runs in
            # another non-daemon thread): exit is under way and takes no new
            # hook; that serving thread still keeps the process alive.
            return
        _registered_at_exit = True


def _wait_at_exit_for(server: Any) -> None:
    """Have interpreter exit wait for *server*'s requests in flight."""
    _wait_at_exit[id(server)] = server
    if not _registered_at_exit:
        _register_exit_hook()


# A program that has threading loaded already pays nothing more: register
# now, while the main thread surely runs.
if "threading" in sys.modules:
    _register_exit_hook()


class _NoThreads:
    """The stdlib's ``_NoThreads``: ``_threads`` of a server whose requests
    nobody waits for."""

    def append(self, thread: Any) -> None:
        pass

    def join(self) -> None:
        pass


class ThreadingMixIn:
    """Mix-in class to handle each request in a thread (of a reused pool)."""

    # Whether request threads should not hold up interpreter exit.
    daemon_threads = False
    # Whether server_close() waits for the requests in flight.
    block_on_close = True
    # Ours: at most this many requests in flight at once; None means no limit.
    max_threads: int | None = None
    # Ours: seconds an idle pool thread lives before it is retired.
    idle_thread_timeout: float = 5.0

    _thread_dispatcher: IThreadDispatcher | None = None
    # The stdlib's private _threads, which code reads (len(server._threads):
    # requests in flight): once a server with block_on_close has dispatched,
    # the non-daemon threads running its requests now (see RequestThreads);
    # before that, or without block_on_close, the stdlib's _NoThreads.
    _threads: Any = _NoThreads()
    # _run_request_thread() ends each request's in-flight record.
    _requests_finish_elsewhere = True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Run one request, in a pool thread: ``finish_request``, then
        ``handle_error`` on an ``Exception``, and ``shutdown_request`` always.
        May be overridden.

        Error handling:
            What escapes it (``SystemExit``, what an overridden
            ``handle_error`` raises) goes to ``threading.excepthook``, as from
            the stdlib's request thread; the pool thread serves on.
        """
        run_request(self, request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand the request to a pool thread and return at once."""
        self._request_threads().dispatch(self._run_request_thread, request, client_address)

    def _run_request_thread(self, request: Any, client_address: Any) -> None:
        # Outside the overridable hook, so that an override cannot leave the
        # request counted as in flight (a graceful stop would wait for it).
        try:
            self.process_request_thread(request, client_address)
        finally:
            self._request_finished(request)  # type: ignore[attr-defined]

    def _request_threads(self) -> IThreadDispatcher:
        # Made on first use so that daemon_threads/max_threads set on the
        # instance after construction still apply.
        if self._thread_dispatcher is None:
            twisted = twisted_side()
            self._thread_dispatcher = twisted.thread_dispatcher(
                name=f"{type(self).__name__}-{id(self):x}",
                max_threads=self.max_threads,
                idle_thread_timeout=self.idle_thread_timeout,
                hold_exit=not self.daemon_threads,
            )
            if not self.daemon_threads:
                _wait_at_exit_for(self)
            if self.block_on_close:
                # As the stdlib's list, it holds non-daemon threads only.
                self._threads = (
                    twisted.request_threads()
                    if self.daemon_threads
                    else self._thread_dispatcher.request_threads
                )
        return self._thread_dispatcher

    def pool_threads(self) -> tuple[int, int, int]:
        """Ours: ``(busy, idle, waiting)``, the pool threads running a request
        and waiting for one, and the requests waiting for a thread (at
        ``max_threads``).  Any thread; a gauge for metrics."""
        dispatcher = self._thread_dispatcher
        if dispatcher is None:
            return (0, 0, 0)
        return dispatcher.counts()

    def server_close(self) -> None:
        """Close the socket; with ``block_on_close`` (and non-daemon threads),
        wait for every request in flight to finish."""
        super().server_close()  # type: ignore[misc]
        _wait_at_exit.pop(id(self), None)
        dispatcher, self._thread_dispatcher = self._thread_dispatcher, None
        if dispatcher is not None:
            dispatcher.close(wait=self.block_on_close and not self.daemon_threads)
