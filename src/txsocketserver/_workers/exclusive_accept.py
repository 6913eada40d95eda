# -*- test-case-name: tests.test_workers_balance -*-
"""How workers that share one listening socket share its connections evenly (Linux).

Without this, every worker waits on the shared socket in the ordinary way
(``poll``, or an ``epoll`` registration of its reactor): each new connection
wakes every worker, and the first back from its wait takes it.  At light load
that is nearly always the same worker (the one that has just answered, still
awake, its caches warm), so one worker serves every connection while the
others idle.

Here each worker waits in ``epoll_wait`` on a set that holds the listening
socket with ``EPOLLEXCLUSIVE`` (Linux ≥ 4.5), and the kernel wakes *one*
worker per connection: the first in the socket's wait queue that is waiting
at that moment; a worker that is busy (a synchronous handler running, a
threading server at ``max_threads``, an async worker's reactor running
handler code) is passed over.  Alone, that picks the first idle worker in a
fixed order (the order they registered), which again favours one worker at
light load; so a worker that is woken moves itself to the back of the queue
(``EPOLL_CTL_DEL`` then ``EPOLL_CTL_ADD``, two system calls), and the next
connection goes to the worker idle the longest.  Connections are thus spread
round-robin over the idle workers, and away from the busy ones.

The wait must be a direct ``epoll_wait`` on the set holding the exclusive
entry: the kernel counts an exclusive wake-up only if a thread waits on that
very set, so a set watched by the reactor's own ``epoll`` (nested) would wake
every worker again.  Hence two shapes:

* serving-thread servers (synchronous, threading, forking):
  :class:`ExclusiveReadiness`, the serving thread's ``IRequestReadiness``,
  waits on a set of its own holding the listening socket and an ``eventfd``
  that ``wake()`` writes; the reactor is not involved in accepting at all.
* async handlers (the reactor accepts): :class:`ExclusiveReactorReader`
  re-registers the socket in the reactor's own ``epoll`` with
  ``EPOLLEXCLUSIVE`` (``compat.exclusive_reader``), and rotates it after each
  wake-up.

Elsewhere (not Linux, an old kernel, a reactor other than Twisted's epoll
reactor) workers keep the ordinary wait: correct, not balanced.  With
``--reuse-port`` each worker has its own socket and none of this applies.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from typing import Any

#: ``select.EPOLLEXCLUSIVE``, where Python and the platform have it.
EPOLLEXCLUSIVE: int | None = getattr(select, "EPOLLEXCLUSIVE", None)


def available() -> bool:
    """Whether exclusive wake-ups can be used here (Linux ≥ 4.5, ``os.eventfd``)."""
    if EPOLLEXCLUSIVE is None or not hasattr(os, "eventfd"):
        return False
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _probe()
    return _AVAILABLE


_AVAILABLE: bool | None = None


def _probe() -> bool:
    """Register an ``eventfd`` with ``EPOLLEXCLUSIVE``: kernels before 4.5 refuse it."""
    assert EPOLLEXCLUSIVE is not None
    epoll = select.epoll()
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        epoll.register(fd, select.EPOLLIN | EPOLLEXCLUSIVE)
    except OSError:
        return False
    finally:
        epoll.close()
        os.close(fd)
    return True


def share_evenly(server: Any, reactor: Any) -> bool:
    """Make *server* (a worker's, on an inherited listening socket) take its
    share of the connections through exclusive, rotating wake-ups.

    Returns:
        Whether it does; ``False`` where exclusive wake-ups are not available
        (the server then waits as any server does).
    """
    if not available():
        return False
    from txsocketserver._async.serving import AsyncServing

    serving = getattr(server, "_serving", None)
    if isinstance(serving, AsyncServing):
        serving.accept_sharing = ExclusiveReactorReader(reactor)
        return True
    server._listener.make_readiness = ExclusiveReadiness
    return True


class ExclusiveReadiness:
    """A serving thread's readiness (``IRequestReadiness``) on a socket shared
    with other workers: it waits in ``epoll_wait`` on a set of its own, woken
    exclusively, and rotates after each wake-up (see the module's docstring).

    Args:
        fd: the listening socket's descriptor.
        holder: what holds the reactor for it (see ``_twisted.reactor``), as
            for ``SocketReadiness``: the server's listener.

    Resource handling:
        The set and the ``eventfd`` are the serving call's: ``close()`` from
        the serving thread closes them.  ``close()`` from another thread
        (``server_close()`` while serving) only takes the socket out of the
        set, before the socket closes, and wakes the serving thread, whose
        serving call then closes them as it ends.
    """

    def __init__(self, fd: int, holder: object = None) -> None:
        from txsocketserver._twisted import reactor as _reactor

        assert EPOLLEXCLUSIVE is not None
        self._fd = fd
        self._flags = select.EPOLLIN | EPOLLEXCLUSIVE
        self._epoll = select.epoll()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._epoll.register(fd, self._flags)
        # Rotation (serving thread) against close() (any thread): the socket
        # must be out of the set before its descriptor can be reused.
        self._lock = threading.Lock()
        self._watching = True
        self._closed = False
        self._owner = threading.get_ident()
        self._holder = self if holder is None else holder
        _reactor.hold(self._holder)

    def wait(self, timeout: float | None) -> bool:
        if not self._watching:
            raise OSError(errno.EBADF, "the server socket was closed while serving")
        events = self._epoll.poll(-1 if timeout is None else timeout)
        ready = False
        for fd, _ in events:
            if fd == self._fd:
                ready = True
            else:
                self._drain()
        if ready:
            self._rotate()
        return ready

    def _rotate(self) -> None:
        # To the back of the socket's wait queue: the next connection wakes
        # the worker that has been idle longest.  Re-adding a socket that
        # still has connections queued reports it ready at once.
        with self._lock:
            if self._watching:
                self._epoll.unregister(self._fd)
                self._epoll.register(self._fd, self._flags)

    def _drain(self) -> None:
        try:
            os.eventfd_read(self._wakeup)
        except (BlockingIOError, OSError):
            pass  # drained by an earlier look, or closed

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                os.eventfd_write(self._wakeup, 1)

    def close(self) -> None:
        from txsocketserver._twisted import reactor as _reactor

        with self._lock:
            if self._watching:
                self._watching = False
                try:
                    self._epoll.unregister(self._fd)
                except OSError:
                    pass  # the socket was closed first: the set forgot it
            if threading.get_ident() == self._owner and not self._closed:
                self._closed = True
                self._epoll.close()
                os.close(self._wakeup)
            elif not self._closed:
                os.eventfd_write(self._wakeup, 1)
        if self._holder is self:
            _reactor.release(self)


class ExclusiveReactorReader:
    """The async serving's side: its acceptor's registration in the
    reactor's own ``epoll``, made exclusive and rotated after each wake-up
    (see the module's docstring).  Reactor thread only."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def watching(self, fd: int) -> None:
        """The acceptor has just added *fd* as a reader."""
        from txsocketserver._twisted import compat

        compat.exclusive_reader(self._reactor, fd)

    def woken(self, fd: int) -> None:
        """The reactor reported *fd* readable: go to the back of the queue."""
        from txsocketserver._twisted import compat

        compat.exclusive_reader(self._reactor, fd)
