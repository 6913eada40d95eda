# -*- test-case-name: tests.test_reactor -*-
"""The bridge between blocking callers and the one Twisted reactor.

Theory of operation
===================

txsocketserver has two kinds of caller:

* **Blocking world.**  Code written for ``socketserver`` calls
  ``serve_forever()``/``handle_request()``/``shutdown()`` from ordinary threads
  and never runs a reactor.  The first time such a call needs the reactor and
  nobody is running it, :func:`running_reactor` starts ``reactor.run()`` in one
  daemon thread, the *reactor thread*, for the rest of the process (as
  ``crochet`` does: a Twisted reactor cannot be restarted, so it is never
  stopped).  Every later server, created and closed in any order, shares it.

* **Twisted world.**  The reactor is already running (``twistd``, ``react``, a
  ``.tac``), in whatever thread its owner chose.  We use that reactor and never
  start another one.

Which thread owns what:

* The reactor thread owns every Twisted object: readers registered with the
  reactor, transports, endpoint ports, timers.  Other threads reach it only
  through ``reactor.callFromThread`` (fire and forget) or :func:`call_in_reactor`
  (wait for the result).
* A server's *serving thread* (the caller of ``serve_forever``/``handle_request``
  or, in the Twisted world, a thread the service starts) runs the
  ``socketserver`` hooks, exactly where the stdlib runs them.  User code never
  runs on the reactor thread, so a slow ``get_request`` (a TLS handshake) or
  ``verify_request`` cannot stall other servers sharing the reactor.
* Handlers run in the serving thread (synchronous servers), in pool threads
  (``ThreadingMixIn``) or in child processes (``ForkingMixIn``).

A blocking call made *on* the reactor thread would wait for work that only the
reactor thread can do: :func:`refuse_reactor_thread` turns that deadlock into a
``RuntimeError`` that names the call.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from typing import Any

# Imported here, never inside a function that a serving thread calls: the
# ``twisted.python`` package is a deprecation proxy whose attribute lookups
# run Python code, and CPython (3.11 at least) clears an exception raised
# while the import machinery reads a module's ``__spec__``, so a Ctrl-C
# (KeyboardInterrupt) landing in ``from twisted.python import ...`` there was
# silently lost and ``serve_forever()`` went on serving.
from twisted.python import threadable

# The reactor is imported when first asked for, not with this module, so that
# a program can install the reactor of its choice before it first makes a server.

# How long a blocking caller waits for the reactor thread to answer before it
# concludes that the reactor is wedged (a handler of somebody else's blocking
# the reactor thread) and raises instead of hanging forever.
REACTOR_CALL_TIMEOUT = 30.0

_start_lock = _thread.allocate_lock()
_reactor_thread: threading.Thread | None = None


def get_reactor() -> Any:
    """Return the global reactor, installing Twisted's default one if needed.

    Imported lazily so that a program can install the reactor of its choice
    before it first uses a server.
    """
    from twisted.internet import reactor

    return reactor


def in_reactor_thread() -> bool:
    """Whether the calling thread is the thread that runs the reactor."""
    return bool(get_reactor().running and threadable.isInIOThread())


def refuse_reactor_thread(call: str) -> None:
    """Raise ``RuntimeError`` if *call* is being made on the reactor thread.

    Args:
        call: the name of the blocking API, for the message.
    """
    if in_reactor_thread():
        raise RuntimeError(
            f"{call}() blocks until other threads answer, and it was called on the "
            "Twisted reactor thread, where it would deadlock. In a program that runs "
            "the reactor, start the server as a service (txsocketserver.ServerService) "
            "or call it from another thread (e.g. twisted.internet.threads.deferToThread)."
        )


def running_reactor() -> Any:
    """Return a running reactor, starting one in a daemon thread if none runs.

    Returns:
        The global reactor, guaranteed to be running when this returns.

    Error handling:
        Raises ``RuntimeError`` if the reactor has already been stopped (a
        Twisted reactor cannot run twice) or does not start in time.
    """
    global _reactor_thread
    reactor = get_reactor()
    if reactor.running:
        return reactor
    with _start_lock:
        if reactor.running:
            return reactor
        if _reactor_thread is None:
            if getattr(reactor, "_stopped", False) and getattr(reactor, "_started", False):
                raise RuntimeError("the Twisted reactor has been stopped and cannot run again")
            started = threading.Event()
            reactor.callWhenRunning(started.set)
            _reactor_thread = threading.Thread(
                target=reactor.run,
                kwargs={"installSignalHandlers": False},
                name="txsocketserver-reactor",
                daemon=True,
            )
            _reactor_thread.start()
            if not started.wait(REACTOR_CALL_TIMEOUT):
                raise RuntimeError("the Twisted reactor did not start")
    return reactor


def call_in_reactor(function: Callable[..., Any], *args: Any) -> Any:
    """Run ``function(*args)`` on the reactor thread and wait for its result.

    The function must not block.  If it returns a Deferred, this waits for the
    Deferred to fire and returns its result.  Called on the reactor thread
    itself, it calls *function* directly and returns whatever it returns (a
    Deferred stays unresolved: the reactor thread cannot wait).

    Error handling:
        An exception raised by *function*, or the Deferred's failure, is
        re-raised in the caller.  If nothing comes back within
        ``REACTOR_CALL_TIMEOUT`` seconds, ``RuntimeError`` is raised rather than
        hanging.
    """
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.interfaces import IReactorThreads
    from twisted.python.failure import Failure

    reactor = running_reactor()
    if threadable.isInIOThread():
        return function(*args)
    done = threading.Event()
    outcome: list[Any] = []

    def finished(result: Any) -> None:
        outcome.append(result)
        done.set()

    def run() -> None:
        maybeDeferred(function, *args).addBoth(finished)

    IReactorThreads(reactor).callFromThread(run)
    if not done.wait(REACTOR_CALL_TIMEOUT):
        raise RuntimeError("the Twisted reactor thread did not answer; is something blocking it?")
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def call_soon(function: Callable[..., object], *args: Any) -> None:
    """Schedule ``function(*args)`` on the reactor thread without waiting."""
    from twisted.internet.interfaces import IReactorThreads

    if in_reactor_thread():
        function(*args)
    else:
        IReactorThreads(get_reactor()).callFromThread(function, *args)


__all__ = [
    "call_in_reactor",
    "call_soon",
    "get_reactor",
    "in_reactor_thread",
    "refuse_reactor_thread",
    "running_reactor",
]
