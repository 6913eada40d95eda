# -*- test-case-name: tests.test_readiness -*-
"""How a serving thread learns that a request can be taken without blocking.

The listening (or datagram) socket is handed to the reactor as a reader.  When
the kernel reports it readable, the reactor thread stops watching it and drops
a token into the serving thread's queue; the serving thread then runs the
stdlib hooks (``get_request`` → ``verify_request`` → ``process_request``) and,
when it next waits, first asks the kernel directly (a ``poll`` that waits at
most ``LINGER``, 1 ms) whether more requests are queued or about to be, so a
burst is drained without one reactor round trip per request.  Only when
nothing comes does it re-arm the reactor watcher.  The look waits briefly
rather than not at all because a client that has just been answered usually
sends its next request within microseconds, and catching it there saves two
thread hand-offs (serving thread → reactor → serving thread) per request,
which dominate the cost of a small request.

While a synchronous server runs a handler nobody watches the socket: new
connections wait in the kernel backlog and datagrams in the socket buffer, as
``request_queue_size`` promises.
"""

from __future__ import annotations

import errno
import queue
import select
import threading
from collections.abc import Callable

from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from txsocketserver._twisted import reactor as _reactor
from txsocketserver._twisted.interfaces import IRequestReadiness

_READY = "ready"
_WAKE = "wake"

# Seconds the serving thread waits on the socket itself, after a request and
# before handing the watch to the reactor.  Short, because wake() (shutdown)
# is noticed only after it; the wait is a blocking poll, not a busy loop.
LINGER = 0.001


@implementer(IReadDescriptor)
class _SocketWatcher:
    """Reactor-thread half: reports a readable fd once, then waits to be re-armed."""

    def __init__(self, fd: int, tokens: queue.SimpleQueue[str]) -> None:
        self._fd = fd
        self._tokens = tokens
        self._watching = False
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "txsocketserver"

    def arm(self) -> None:
        if not self._closed and not self._watching:
            self._watching = True
            _reactor.get_reactor().addReader(self)

    def disarm(self) -> None:
        self._closed = True
        if self._watching:
            self._watching = False
            _reactor.get_reactor().removeReader(self)

    def doRead(self) -> None:
        # Level-triggered: stop watching until the serving thread has taken
        # what is queued, or the reactor would report the same fd forever.
        self._watching = False
        _reactor.get_reactor().removeReader(self)
        self._tokens.put(_READY)

    def connectionLost(self, reason: Failure) -> None:
        # The fd went bad under the reactor (closed behind our back): wake the
        # serving thread so that its own get_request() meets the error.
        self._watching = False
        self._tokens.put(_READY)


def _make_poller(fd: int) -> Callable[[float], bool]:
    """Return a function that asks the kernel whether *fd* is or becomes
    readable within *timeout* seconds, and raises ``OSError(EBADF)`` once *fd*
    has been closed."""
    if not hasattr(select, "poll"):
        return lambda timeout: bool(select.select([fd], [], [], timeout)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)

    def pending_now(timeout: float) -> bool:
        events = poller.poll(timeout * 1000)
        if events and events[0][1] & select.POLLNVAL:
            raise OSError(errno.EBADF, "the server socket was closed while serving")
        return bool(events)

    return pending_now


@implementer(IRequestReadiness)
class SocketReadiness:
    """Readiness of a server's own socket, watched by the reactor.

    Args:
        fd: the listening (stream) or bound (datagram) socket's file descriptor.
        holder: what holds the reactor for it (see ``_twisted.reactor``): the
            server's listener, which releases it when closed; by default the
            readiness itself, for this serving call.
    """

    def __init__(self, fd: int, holder: object = None) -> None:
        self._tokens: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._watcher = _SocketWatcher(fd, self._tokens)
        self._pending_now = _make_poller(fd)
        self._armed = False
        self._owner = threading.get_ident()
        self._holder = self if holder is None else holder
        _reactor.hold(self._holder)

    def wait(self, timeout: float | None) -> bool:
        if not self._armed:
            if self._pending_now(LINGER if timeout is None else min(LINGER, timeout)):
                return True
            _reactor.call_soon(self._watcher.arm)
            self._armed = True
        try:
            token = self._tokens.get(timeout=timeout)
        except queue.Empty:
            return False
        if token == _READY:
            self._armed = False
            return True
        return False

    def wake(self) -> None:
        self._tokens.put(_WAKE)

    def close(self) -> None:
        # Idempotent and callable from any thread: server_close() may close
        # the socket while another thread serves, and the reactor must forget
        # the fd before the kernel can reuse its number.
        if self._armed or not self._serving_thread_calls():
            _reactor.call_in_reactor(self._watcher.disarm)
        else:
            # Not registered with the reactor and no arm() on its way to it.
            self._watcher.disarm()
        if self._holder is self:
            _reactor.release(self)

    def _serving_thread_calls(self) -> bool:
        return threading.get_ident() == self._owner
