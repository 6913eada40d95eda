# -*- test-case-name: tests.test_worker_lifecycle -*-
"""Log files that ``SIGUSR1`` reopens (logrotate's ``postrotate``).

``--log-file PATH`` points the process's standard output and standard error
at *PATH* (opened for appending): the log, tracebacks, a handler's prints,
``faulthandler``'s stacks and, with ``--workers``, every worker's output go
there.  After logrotate renames the file, ``SIGUSR1`` makes each process
open *PATH* anew and move its descriptors 1 and 2 onto it; the supervisor
of ``--workers`` passes the signal on to its workers, which reopen the same
path.  Other files that must follow a rotation (an access log) register a
callable with :func:`on_reopen`.

Twisted-free: worker processes use it before their reactor exists.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_reopeners: list[Callable[[], None]] = []


def on_reopen(reopen: Callable[[], None]) -> None:
    """Call *reopen* on every ``SIGUSR1`` (in the main thread, between bytecodes)."""
    _reopeners.append(reopen)


def reopen_all() -> None:
    """Reopen every registered log file now (what ``SIGUSR1`` does)."""
    for reopen in list(_reopeners):
        reopen()


def log_to_file(path: str) -> None:
    """Point standard output and standard error at *path*, now and after each reopen.

    Error handling:
        ``OSError`` if *path* cannot be opened for appending (at start: a
        usage error).  A failed reopen keeps the file open before it and
        says so on it.
    """
    _redirect(path)

    def reopen() -> None:
        try:
            _redirect(path)
        except OSError as exc:
            print(f"cannot reopen --log-file {path}: {exc}; writing on", file=sys.stderr)

    on_reopen(reopen)


def _redirect(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def handle_sigusr1(also: Callable[[], None] | None = None) -> None:
    """Make ``SIGUSR1`` reopen the log files, then call *also* (main thread only).

    A handler installed before (``twistd --logfile`` rotates its log on
    ``SIGUSR1``) still runs, after ours.
    """
    previous = signal.getsignal(signal.SIGUSR1)

    def handler(signum: int, frame: Any) -> None:
        reopen_all()
        if also is not None:
            also()
        if callable(previous) and previous is not handler:
            previous(signum, frame)

    signal.signal(signal.SIGUSR1, handler)


__all__ = ["handle_sigusr1", "log_to_file", "on_reopen", "reopen_all"]
