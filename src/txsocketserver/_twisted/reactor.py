# -*- test-case-name: tests.test_reactor,tests.test_reactor_lifecycle -*-
"""The bridge between blocking callers and the one Twisted reactor.

Theory of operation
===================

txsocketserver has two kinds of caller:

* **Blocking world.**  Code written for ``socketserver`` calls
  ``serve_forever()``/``handle_request()``/``shutdown()`` from ordinary threads
  and never runs a reactor.  While something needs the reactor and nobody else
  runs it, one daemon thread of ours, the *reactor thread*, runs it (as
  ``crochet`` does); every server shares it.  It exists only while it is
  needed: once the last server is closed the process is back where it was, no
  thread of ours left, and the program may run the reactor itself
  (``reactor.run()``, ``react()``, ``trial``), or make a server again.

* **Twisted world.**  The reactor is already running (``twistd``, ``react``, a
  ``.tac``), in whatever thread its owner chose.  We use that reactor and never
  start, stop or hold it.

The reactor thread's life
-------------------------

What needs the reactor says so with :func:`hold` and :func:`release`, each
for an *owner*: a server's listener from its first serving call (an endpoint
server's, also from a ``fileno()`` to select on) until it is closed; a thread
or process dispatcher, and an async server's strategy, until closed; a
service started on our reactor until it has stopped.  A garbage-collected
owner releases its hold.  Every :func:`call_in_reactor` holds the reactor
while the call is in flight; a ``callFromThread`` must come from a holder.  The first hold
starts the thread, which calls ``reactor.run(installSignalHandlers=False)``:
Twisted's own loop, untouched, so the serving path costs what it cost before.

When the last hold is released, the reactor thread looks at what Twisted still
has in hand (``compat.reactor_work``): nothing, and it stops its loop with
``reactor.crash()`` and ends; only descriptors closing (a transport sending its
last bytes), and it looks again every few milliseconds; anything else (a
connection a handler still uses after its server was closed, a child process
not yet reaped), and it keeps running it, looking again now and then, as the
stdlib's request threads outlive ``server_close()``.  The caller of the last
:func:`release` waits (bounded) for the thread to end, so that the thread is
gone when ``server_close()`` returns, where thread-leak checks look.

Why ``crash()``: a Twisted reactor cannot be run again after ``stop()``, but
after ``crash()`` it can (``trial`` runs and crashes it for every test), with
its delayed calls, its waker and its ``callWhenRunning`` queue intact, so the
next hold (ours) or ``reactor.run()`` (the program's) simply runs it again.  A
reactor that the program ran and *stopped* (``react()`` ends so) is made
runnable again by ``compat.make_runnable_again`` before our thread runs it.
Leaving, the thread also stops the reactor's own thread pool (if anything
used it: ``deferToThread``, name resolution) and hands ``threadable``'s idea of
the I/O thread back to whatever ran the reactor before it.  Signal handlers
are never ours to install: the program's ``reactor.run()`` installs Twisted's
(``SIGCHLD`` reaping included) for its own run, as it always does.

The world is told by ``reactor.running`` with no thread of ours: the program's
reactor; :func:`hold` then does nothing, and nothing waits for it.

Which thread owns what:

* The reactor thread owns every Twisted object: readers registered with the
  reactor, transports, endpoint ports, timers.  Other threads reach it only
  through ``reactor.callFromThread`` (fire and forget, by a caller that holds
  the reactor) or :func:`call_in_reactor` (wait for the result).
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
import time
import weakref
from collections.abc import Callable
from typing import Any

# Imported here, never inside a function that a serving thread calls: the
# ``twisted.python`` package is a deprecation proxy whose attribute lookups
# run Python code, and CPython (3.11 at least) clears an exception raised
# while the import machinery reads a module's ``__spec__``, so a Ctrl-C
# (KeyboardInterrupt) landing in ``from twisted.python import ...`` there was
# silently lost and ``serve_forever()`` went on serving.
from twisted.python import threadable

from txsocketserver._twisted import compat

# The reactor is imported when first asked for, not with this module, so that
# a program can install the reactor of its choice before it first makes a server.

# How long a blocking caller waits for the reactor thread to answer before it
# concludes that the reactor is wedged (a handler of somebody else's blocking
# the reactor thread) and raises instead of hanging forever.
REACTOR_CALL_TIMEOUT = 30.0

# How long the last release waits for the reactor thread to finish closing
# what is closing (transports sending their last bytes) and end.
WIND_DOWN_TIMEOUT = 2.0

# With no hold left, how soon the reactor thread looks again at what it has in
# hand: soon while only closing work remains, rarely while a connection that
# outlived its server is still in use.
_LOOK_AGAIN_CLOSING = 0.005
_LOOK_AGAIN_BUSY = 0.1

# _lock guards the state below; it is held only briefly, never while waiting
# for the reactor thread (which takes it too).  _start_lock serialises the
# start of a thread (and the wait for the previous one to end); the reactor
# thread never takes it.
_lock = _thread.allocate_lock()
_start_lock = _thread.allocate_lock()
_owners: dict[int, weakref.finalize[Any, Any]] = {}  # id(owner) -> its hold
_calls = 0  # call_in_reactor calls in flight that hold the reactor
_drive: _Drive | None = None  # our thread running the reactor, if any
_ending: _Drive | None = None  # our thread that has decided to end


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


class _Drive:
    """One run of the reactor in a thread of ours, from a first hold to the
    moment no hold is left and Twisted has nothing in hand."""

    def __init__(self, reactor: Any, after: _Drive | None) -> None:
        self.reactor = reactor
        self.after = after  # our previous thread, still leaving
        self.running = threading.Event()  # set once run() has started (or failed)
        self.error: BaseException | None = None
        self.look_again: Any = None  # the next wind_down(), scheduled; reactor thread
        self.thread = threading.Thread(
            target=self._run, name="txsocketserver-reactor", daemon=True
        )

    def _run(self) -> None:
        global _ending
        if self.after is not None:
            # run() must wait until the previous loop has left.
            self.after.thread.join(REACTOR_CALL_TIMEOUT)
            self.after = None
        previous_io_thread = compat.io_thread()
        try:
            compat.make_runnable_again(self.reactor)
            self.reactor.callWhenRunning(self.running.set)
            self.reactor.run(installSignalHandlers=False)
        except BaseException as exc:
            self.error = exc
            self.running.set()
        finally:
            compat.set_io_thread(previous_io_thread)
            with _lock:
                if _ending is self:
                    _ending = None

    def wind_down(self) -> str:
        """With no hold left, end the run if Twisted has nothing in hand
        (reactor thread).  Returns what it found: ``compat.IDLE`` (the loop
        stops), ``CLOSING`` or ``BUSY`` (it looks again later), or
        ``"held"`` (a hold came meanwhile: nothing to do)."""
        global _drive, _ending
        call, self.look_again = self.look_again, None
        if call is not None and call.active():
            call.cancel()
        with _lock:
            if _drive is not self or _owners or _calls:
                return "held"
            work = compat.reactor_work(self.reactor)
            if work == compat.IDLE:
                _drive, _ending = None, self
        if work == compat.IDLE:
            compat.stop_reactor_thread_pool(self.reactor)
            self.reactor.crash()
        else:
            delay = _LOOK_AGAIN_CLOSING if work == compat.CLOSING else _LOOK_AGAIN_BUSY
            self.look_again = self.reactor.callLater(delay, self.wind_down)
        return work


def hold(owner: object) -> Any:
    """Keep the reactor running until :func:`release` (*owner*) is called, or
    *owner* is garbage-collected; start it in our thread if nobody runs it.

    Idempotent per owner.  In the Twisted world (the program runs the reactor)
    it does nothing.

    Returns:
        The global reactor, running when this returns.

    Error handling:
        ``RuntimeError`` if the reactor does not start in time.
    """
    key = id(owner)
    held = _owners.get(key)
    if held is not None and held.alive:  # the common case: a server serving again
        return get_reactor()

    def count() -> None:
        # An entry left by a collected owner of the same id is taken over.
        held = _owners[key] = weakref.finalize(owner, _release_collected, key)
        held.atexit = False

    def uncount() -> None:
        held = _owners.pop(key, None)
        if held is not None:
            held.detach()

    return _acquire(count, uncount)


def release(owner: object) -> None:
    """Drop *owner*'s hold (nothing if it holds none).  Dropping the last one
    ends our reactor thread once Twisted has finished what it has in hand,
    waiting for that (at most ``WIND_DOWN_TIMEOUT`` seconds) unless called on
    the reactor thread."""
    with _lock:
        hold_of_owner = _owners.pop(id(owner), None)
    if hold_of_owner is not None:
        hold_of_owner.detach()
        _released()


def _release_collected(key: int) -> None:
    # A garbage-collected owner: any thread, maybe inside a section holding
    # _lock; the reactor thread takes it from here.
    get_reactor().callFromThread(_release_key, key)


def _release_key(key: int) -> None:
    with _lock:
        held = _owners.get(key)
        found = held is not None and not held.alive
        if found:
            del _owners[key]
    if found:
        _released()


def _acquire(count: Callable[[], None], uncount: Callable[[], None]) -> Any:
    """Count a hold (``count()``, called with ``_lock`` held) and return the
    running reactor, starting our thread if needed; in the Twisted world,
    count nothing.  If the reactor does not run, ``uncount()`` (``_lock``
    held) takes the hold back and ``RuntimeError`` is raised."""
    global _drive
    reactor = get_reactor()
    with _lock:
        drive = _drive
        if drive is not None:
            count()
        elif reactor.running and _ending is None:
            return reactor  # the program's reactor
    if drive is None:
        with _start_lock:
            with _lock:
                drive, ending = _drive, _ending
                if drive is not None:
                    count()  # started by another thread meanwhile
            if drive is None:
                if ending is None and reactor.running:
                    return reactor  # the program ran the reactor meanwhile
                drive = _Drive(reactor, ending)
                with _lock:
                    _drive = drive
                    count()
                drive.thread.start()
                if ending is not None and ending.thread is threading.current_thread():
                    # Called on the very thread that is leaving (in its last
                    # turn): the new one runs once this one has left.
                    return reactor
    try:
        if not drive.running.is_set() and not drive.running.wait(REACTOR_CALL_TIMEOUT):
            raise RuntimeError("the Twisted reactor did not start")
        if drive.error is not None:
            raise RuntimeError(f"the Twisted reactor could not run: {drive.error!r}")
    except BaseException:
        with _lock:
            uncount()
            if _drive is drive:
                _drive = None
        raise
    return reactor


def _released() -> None:
    """A hold was dropped: with none left, wind our thread down."""
    with _lock:
        drive = _drive
        if drive is None or _owners or _calls:
            return
    if drive.thread is threading.current_thread():
        drive.wind_down()
        return
    found: list[str] = []
    decided = threading.Event()

    def wind_down() -> None:
        found.append(drive.wind_down())
        decided.set()

    drive.reactor.callFromThread(wind_down)
    if not decided.wait(REACTOR_CALL_TIMEOUT):
        return  # a wedged reactor: leave it be
    if found[0] == compat.CLOSING:
        deadline = time.monotonic() + WIND_DOWN_TIMEOUT
        while drive.thread.is_alive() and time.monotonic() < deadline:
            with _lock:
                if _drive is drive and (_owners or _calls):
                    return  # held again
            drive.thread.join(_LOOK_AGAIN_CLOSING)
    if found[0] in (compat.IDLE, compat.CLOSING):
        drive.thread.join(REACTOR_CALL_TIMEOUT)


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
    global _calls
    if in_reactor_thread():
        return function(*args)
    counted = []

    def count() -> None:
        global _calls
        _calls += 1
        counted.append(True)

    def uncount() -> None:
        global _calls
        _calls -= 1
        counted.clear()

    reactor = _acquire(count, uncount)
    try:
        return _call_and_wait(reactor, function, args)
    finally:
        if counted:
            with _lock:
                _calls -= 1
            _released()


def _call_and_wait(reactor: Any, function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    from twisted.internet.defer import maybeDeferred
    from twisted.internet.interfaces import IReactorThreads
    from twisted.python.failure import Failure

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
    "REACTOR_CALL_TIMEOUT",
    "WIND_DOWN_TIMEOUT",
    "call_in_reactor",
    "call_soon",
    "get_reactor",
    "hold",
    "in_reactor_thread",
    "refuse_reactor_thread",
    "release",
]
