# -*- test-case-name: tests.test_forking_server_fork,tests.test_forking -*-
"""``ServerForkDispatcher``: ``fork_from = "server"``, the stdlib's own way.

For each request the serving thread calls ``os.fork()`` on the serving
process itself, as the stdlib's ``ForkingMixIn`` does, and the child runs
the stdlib's child code (``finish_request``, ``handle_error``,
``shutdown_request``, ``os._exit``).  The child is a copy of the server
process: it has the whole server object, every module as the program left
it, and everything else the stdlib's child has; nothing is pickled.

The server process runs other threads (the reactor's, pool threads), and a
fork copies only the thread that calls it: every lock another thread held
at that instant stays held in the child, for good.  Python 3.12 and later
say so with a ``DeprecationWarning`` at each such fork ("This process is
multi-threaded, use of fork() may lead to deadlocks in the child").  Here
the child runs only the request: it never touches the reactor, the thread
pools or anything of Twisted's (an endpoint's socket facade, which needs the
reactor, is refused), and leaves with ``os._exit``, running no ``atexit``
hook and joining no thread.  What remains is what the handler itself touches:
a lock that another thread of the program held at the fork (a logging
handler's while it was writing, say).  ``docs/forking.md`` tells the user
when to choose this.

Each child is reaped by pid (a pidfd tells when it has exited), never with
``waitpid(-1)``: a child that another part of the program started keeps its
exit status for its owner.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from zope.interface import implementer

from txsocketserver._forking.exits import ExitReports
from txsocketserver._forking.template import flush_stdio
from txsocketserver._twisted.interfaces import IProcessDispatcher

_PIDFDS = hasattr(os, "pidfd_open")

# Python's warning about forking a multi-threaded process, for the forks of
# this module only: the user chose them (see the module docstring).
_FORK_WARNING = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\)"


@implementer(IProcessDispatcher)
class ServerForkDispatcher:
    """Runs each request in a child forked from the serving process itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # pid -> its pidfd (-1 where there are none).
        self._children: dict[int, int] = {}
        self._exits = ExitReports()
        warnings.filterwarnings(
            "ignore", _FORK_WARNING, DeprecationWarning, __name__.replace(".", r"\.")
        )

    # -- IRequestDispatcher ------------------------------------------------------

    def dispatch(self, function: Callable[..., object], *args: Any) -> int:
        """Fork a child that runs ``function(*args)``; return its pid, the
        request's tag for :meth:`report_exit`."""
        request = args[0]
        connection = request[1] if isinstance(request, tuple) else request
        if not isinstance(connection, socket.socket):
            raise TypeError(
                'ForkingMixIn with fork_from = "server" needs the request to be a '
                f"socket, not a {type(connection).__name__}: an endpoint's connection "
                "lives in the reactor thread, which a forked child does not have; "
                'serve the endpoint with fork_from = "template" (the default)'
            )
        # What the parent has buffered is written once, by the parent.
        flush_stdio()
        pid = os.fork()
        if pid == 0:
            _run_child(function, args)
        with self._lock:
            self._children[pid] = os.pidfd_open(pid) if _PIDFDS else -1
        return pid

    def report_exit(self, tag: int, what: Any) -> None:
        """Have :meth:`take_exits` return *what* once the child *tag* has been reaped."""
        with self._lock:
            self._exits.watch(tag, what, running=tag in self._children)

    def take_exits(self, everything: bool = False) -> list[tuple[Any, int | None]]:
        """``(what, exit code)`` of the watched children reaped since the last
        call; with *everything*, the ones still running too (code ``None``)."""
        self._reap(0)
        with self._lock:
            return self._exits.take(everything)

    def upkeep(self) -> None:
        self._reap(0)

    def close(self, wait: bool) -> None:
        if wait:
            self.wait_idle(None)
            return
        with self._lock:
            left, self._children = self._children, {}
        if left:
            # The stdlib leaves them as zombies until the process exits;
            # reap them as they end, without holding up the caller.
            threading.Thread(
                target=_reap_all, args=(left,), name="txsocketserver-fork-reaper", daemon=True
            ).start()

    # -- IProcessDispatcher ------------------------------------------------------

    def warm_up(self, server: Any) -> None:
        """Nothing to prepare: the child is a copy of the server process."""

    def wait_below(self, limit: int) -> None:
        while True:
            with self._lock:
                if len(self._children) < limit:
                    return
            self._reap(None)

    def wait_idle(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._children:
                    return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._reap(remaining)

    def running_pids(self) -> set[int]:
        self._reap(0)
        with self._lock:
            return set(self._children)

    # -- reaping -----------------------------------------------------------------

    def _reap(self, timeout: float | None) -> None:
        """Reap the children that have exited, waiting up to *timeout* seconds
        (``None``: for ever) for one to, if none has."""
        with self._lock:
            children = dict(self._children)
        if not children:
            return
        codes: dict[int, int | None] = {}
        if _PIDFDS:
            poller = select.poll()
            for pidfd in children.values():
                poller.register(pidfd, select.POLLIN)
            milliseconds = None if timeout is None else max(0, int(timeout * 1000))
            by_fd = {pidfd: pid for pid, pidfd in children.items()}
            ended = [by_fd[fd] for fd, _events in poller.poll(milliseconds)]
        else:
            for pid in children:
                if (code := _wait(pid, block=False)) is not _RUNNING:
                    codes[pid] = code
            if not codes and timeout != 0:
                # No pidfds (not Linux): wait for the oldest child.
                oldest = next(iter(children))
                codes[oldest] = _wait(oldest, block=True)
            ended = list(codes)
        with self._lock:
            for pid in ended:
                if pid not in self._children:
                    continue  # another thread reaped it
                pidfd = self._children.pop(pid)
                if pidfd >= 0:
                    os.close(pidfd)
                    codes[pid] = _wait(pid, block=True)
                code = codes.get(pid)
                self._exits.ended(pid, None if code is _RUNNING else code)


# What _wait() says of a child that is still running.
_RUNNING: Any = object()


def _wait(pid: int, *, block: bool) -> Any:
    """Reap *pid* if it has exited (waiting for it with *block*): its exit
    code (``None`` if somebody else reaped it), or ``_RUNNING``."""
    try:
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else _RUNNING


def _reap_all(children: dict[int, int]) -> None:
    for pid, pidfd in children.items():
        _wait(pid, block=True)
        if pidfd >= 0:
            os.close(pidfd)


def _run_child(function: Callable[..., object], args: tuple[Any, ...]) -> None:
    """The child: run the request (the function exits the process). Never returns."""
    try:
        # Twisted's signal plumbing, if a reactor of the parent's installed
        # it, belongs to the parent's reactor: a SIGCHLD of the handler's
        # own children must not write to the parent's wake-up pipe.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        server = getattr(function, "__self__", None)
        if server is not None:
            # What acts on the serving process's resources stays there, as
            # for a child of the template (ForkingMixIn._serving_process_only).
            server._forking_dispatcher = None
            server._rebuilt_in_request_process()
            # An ssl: server's handshake, done here, is logged on stderr
            # (Twisted's logging belongs to the parent) and said by the exit
            # status, as in a template's child (_forking.tls).
            for_child = getattr(getattr(server, "_security", None), "for_child", None)
            if for_child is not None:
                server._security = for_child()
        function(*args)
    except BaseException:
        try:
            import traceback

            traceback.print_exc()
        finally:
            flush_stdio()
            os._exit(1)
    flush_stdio()
    os._exit(1)


__all__ = ["ServerForkDispatcher"]
