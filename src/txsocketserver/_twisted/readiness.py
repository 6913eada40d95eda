# -*- test-case-name: tests.test_readiness -*-
"""How a serving thread learns that a request can be taken without blocking.

The serving thread waits in ``poll()`` on two descriptors: the listening (or
datagram) socket, and the read end of a pipe of its own, which ``wake()``
(``shutdown()``) writes a byte to.  A request arriving at an idle server thus
costs one system call's return, as in the stdlib's ``select``: no thread
hand-off, no reactor turn, and a ``shutdown()`` is still seen at once instead
of after ``poll_interval``.  The reactor is not involved in waiting; the
listener holds it all the same (``_twisted.reactor``) for what a server may
hand it.

While a synchronous server runs a handler nobody polls the socket: new
connections wait in the kernel backlog and datagrams in the socket buffer, as
``request_queue_size`` promises.

The pipe and the poll object belong to one serving call.  ``close()`` from
another thread (``server_close()`` while serving) only takes the socket out
of the set, before it closes, and wakes the serving thread; the serving
thread's own ``close()`` then closes the pipe.  A lock orders ``wake()``
against that close, so a late ``wake()`` never writes to a reused descriptor.
"""

from __future__ import annotations

import errno
import os
import select
import threading
from typing import Any

from zope.interface import implementer

from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.interfaces import IRequestReadiness

_POLLNVAL = getattr(select, "POLLNVAL", 0)


def _closed_while_serving() -> OSError:
    return OSError(errno.EBADF, "the server socket was closed while serving")


@implementer(IRequestReadiness)
class SocketReadiness:
    """Readiness of a server's own socket, polled by the serving thread.

    Args:
        fd: the listening (stream) or bound (datagram) socket's file descriptor.
        holder: what holds the reactor for it (see ``_twisted.reactor``): the
            server's listener, which releases it when closed; by default the
            readiness itself, for this serving call.

    Resource handling:
        Two descriptors (a pipe) for the serving call, closed by ``close()``
        on the serving thread.
    """

    def __init__(self, fd: int, holder: object = None) -> None:
        # The hold first: if the reactor cannot start, no pipe is left open.
        self._holder = self if holder is None else holder
        _reactor.hold(self._holder)
        self._fd = fd
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._select = not hasattr(select, "poll")
        if not self._select:
            self._watch()
        self._lock = threading.Lock()
        self._watching = True
        self._closed = False
        self._owner = threading.get_ident()

    def _watch(self) -> None:
        self._poller: Any = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self._poller.register(self._wake_read, select.POLLIN)

    def _unwatch(self) -> None:
        self._poller.unregister(self._fd)

    def wait(self, timeout: float | None) -> bool:
        if not self._watching:
            raise _closed_while_serving()
        if self._select:
            return self._select_wait(timeout)
        ready = False
        for fd, events in self._poller.poll(None if timeout is None else timeout * 1000):
            if fd != self._fd:
                self._drain()
                return False
            if events & _POLLNVAL:
                raise _closed_while_serving()
            ready = True
        return ready

    def _select_wait(self, timeout: float | None) -> bool:
        readable = select.select([self._fd, self._wake_read], [], [], timeout)[0]
        if self._wake_read in readable:
            self._drain()
            return False
        return bool(readable)

    def _drain(self) -> None:
        try:
            while os.read(self._wake_read, 512):
                pass
        except OSError:
            pass  # empty (BlockingIOError)

    def wake(self) -> None:
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._wake_write, b"w")
                except BlockingIOError:
                    pass  # the pipe is full: a wake is pending anyway

    def close(self) -> None:
        # Idempotent and callable from any thread: server_close() may close
        # the socket while another thread serves, and the socket must leave
        # the set before the kernel can reuse its number.
        with self._lock:
            if self._watching:
                self._watching = False
                if not self._select:
                    self._unwatch()
            if not self._closed:
                if threading.get_ident() == self._owner:
                    self._closed = True
                    os.close(self._wake_read)
                    os.close(self._wake_write)
                    self._close_poller()
                else:
                    try:
                        os.write(self._wake_write, b"w")
                    except BlockingIOError:
                        pass
        if self._holder is self:
            _reactor.release(self)

    def _close_poller(self) -> None:
        pass  # a poll object holds no descriptor


#: ``select.EPOLLEXCLUSIVE``, where Python and the platform have it.
EPOLLEXCLUSIVE: int | None = getattr(select, "EPOLLEXCLUSIVE", None)
_exclusive_available: bool | None = None


def exclusive_available() -> bool:
    """Whether :class:`ExclusiveSocketReadiness` can be used here (Linux >= 4.5)."""
    global _exclusive_available
    if _exclusive_available is None:
        _exclusive_available = EPOLLEXCLUSIVE is not None and _probe_exclusive(EPOLLEXCLUSIVE)
    return _exclusive_available


def _probe_exclusive(flag: int) -> bool:
    # Kernels before 4.5 refuse the flag.
    read, write = os.pipe()
    try:
        with select.epoll() as epoll:
            epoll.register(read, select.EPOLLIN | flag)
    except OSError:
        return False
    finally:
        os.close(read)
        os.close(write)
    return True


class ExclusiveSocketReadiness(SocketReadiness):
    """The readiness of a listening socket that other processes wait on too
    (``--workers``): the serving thread waits in ``epoll_wait`` on a set of
    its own where the socket is registered with ``EPOLLEXCLUSIVE``, so that
    the kernel wakes one waiting process per connection instead of all of
    them; after each wake-up the socket is registered again, which puts this
    process at the back of the socket's wait queue, so the next connection
    goes to the process idle the longest (``_workers/exclusive_accept.py``
    tells why).  Linux >= 4.5 only (:func:`exclusive_available`).

    Resource handling:
        As :class:`SocketReadiness`, plus the ``epoll`` set, closed with the pipe.
    """

    def _watch(self) -> None:
        assert EPOLLEXCLUSIVE is not None
        self._events = select.EPOLLIN | EPOLLEXCLUSIVE
        self._poller = select.epoll()
        self._poller.register(self._wake_read, select.EPOLLIN)
        self._poller.register(self._fd, self._events)

    def _unwatch(self) -> None:
        try:
            self._poller.unregister(self._fd)
        except OSError:
            pass  # the socket was closed first: the set forgot it

    def _close_poller(self) -> None:
        self._poller.close()

    def wait(self, timeout: float | None) -> bool:
        if not self._watching:
            raise _closed_while_serving()
        ready = False
        for fd, _ in self._poller.poll(-1 if timeout is None else timeout):
            if fd == self._fd:
                ready = True
            else:
                self._drain()
        if ready:
            # To the back of the socket's wait queue.  Registering a socket
            # that still has connections queued reports it ready at once.
            with self._lock:
                if self._watching:
                    self._poller.unregister(self._fd)
                    self._poller.register(self._fd, self._events)
        return ready
