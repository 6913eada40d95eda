"""The reactor bridge (``_twisted/reactor.py``): one reactor, reached from any thread.

What servers make of it (a blocking call refused on the reactor thread, servers
made one after another sharing the reactor) is tested in
``test_stream_lifecycle.py`` and ``test_service.py``, and the reactor thread's
life (it exists only while held) in ``test_reactor_lifecycle.py``; here are the
bridge's own promises, with the reactor of the blocking world held for this
module's tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from twisted.internet.defer import Deferred

from support import WAIT
from txsocketserver._twisted import reactor as bridge


class Boom(Exception):
    pass


class _ModuleHold:
    """What holds the reactor for this module's tests."""


@pytest.fixture(autouse=True, scope="module")
def held() -> Iterator[None]:
    owner = _ModuleHold()
    bridge.hold(owner)
    yield
    bridge.release(owner)


def test_the_blocking_world_runs_one_reactor_in_a_daemon_thread() -> None:
    reactor = bridge.hold(_ModuleHold())
    assert reactor.running
    assert bridge.get_reactor() is reactor
    assert not bridge.in_reactor_thread()
    runs = bridge.call_in_reactor(threading.current_thread)
    assert runs is not threading.current_thread()
    assert runs.daemon and runs.name == "txsocketserver-reactor"


def test_call_in_reactor_runs_on_the_reactor_thread_and_returns_the_result() -> None:
    assert bridge.call_in_reactor(lambda a, b: (bridge.in_reactor_thread(), a + b), 2, 3) == (
        True,
        5,
    )


def test_call_in_reactor_waits_for_a_deferred() -> None:
    def later() -> Deferred[str]:
        d: Deferred[str] = Deferred()
        bridge.get_reactor().callLater(0, d.callback, "fired")
        return d

    assert bridge.call_in_reactor(later) == "fired"


def test_call_in_reactor_raises_what_the_function_raised() -> None:
    def raises() -> None:
        raise Boom("in the reactor")

    def fails() -> Deferred[None]:
        d: Deferred[None] = Deferred()
        bridge.get_reactor().callLater(0, d.errback, Boom("a failed Deferred"))
        return d

    with pytest.raises(Boom, match="in the reactor"):
        bridge.call_in_reactor(raises)
    with pytest.raises(Boom, match="a failed Deferred"):
        bridge.call_in_reactor(fails)


def test_call_in_reactor_from_the_reactor_thread_calls_directly() -> None:
    def nested() -> object:
        # A Deferred would stay unresolved: the reactor thread cannot wait.
        d: Deferred[None] = Deferred()
        return bridge.call_in_reactor(lambda: d) is d

    assert bridge.call_in_reactor(nested) is True


def test_call_soon_runs_on_the_reactor_thread_without_waiting() -> None:
    ran = threading.Event()
    where: list[bool] = []
    release = threading.Event()

    def blocked_then_note() -> None:
        where.append(bridge.in_reactor_thread())
        ran.set()

    # The reactor is busy until we release it: call_soon must return anyway.
    bridge.call_soon(release.wait, WAIT)
    bridge.call_soon(blocked_then_note)
    assert not ran.is_set()
    release.set()
    assert ran.wait(WAIT)
    assert where == [True]


def test_a_blocking_call_on_the_reactor_thread_is_refused_with_what_to_do() -> None:
    bridge.refuse_reactor_thread("serve_forever")  # off the reactor thread: nothing

    def on_reactor() -> str:
        with pytest.raises(RuntimeError) as raised:
            bridge.refuse_reactor_thread("serve_forever")
        return str(raised.value)

    message = bridge.call_in_reactor(on_reactor)
    assert message.startswith("serve_forever() blocks until other threads answer")
    assert "txsocketserver.ServerService" in message
