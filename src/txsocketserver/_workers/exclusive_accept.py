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

* serving-thread servers (synchronous, threading, forking): the serving
  thread waits on the socket itself, as every such server does
  (``_twisted/readiness.py``); in a worker it waits in
  ``ExclusiveSocketReadiness``, a set of its own holding the listening socket
  (exclusive) and the wake-up pipe.
* async handlers (the reactor accepts): :class:`ExclusiveReactorReader`
  re-registers the socket in the reactor's own ``epoll`` with
  ``EPOLLEXCLUSIVE`` (``compat.exclusive_reader``), and rotates it after each
  wake-up.

Elsewhere (not Linux, an old kernel, a reactor other than Twisted's epoll
reactor) workers keep the ordinary wait: correct, not balanced.  With
``--reuse-port`` each worker has its own socket and none of this applies.
"""

from __future__ import annotations

from typing import Any

from txsocketserver._twisted.readiness import ExclusiveSocketReadiness, exclusive_available


def available() -> bool:
    """Whether exclusive wake-ups can be used here (Linux >= 4.5)."""
    return exclusive_available()


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
    server._listener.make_readiness = ExclusiveSocketReadiness
    return True


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
