"""How a serving thread learns a request is waiting (``_twisted/readiness.py``).

``SocketReadiness`` on a real listening socket: the kernel's own answer first,
the reactor's watch otherwise, and ``wake()`` for ``shutdown()``.  The serving
loop built on it is tested through the servers (``test_stream_basic.py``,
``test_stream_lifecycle.py``); the endpoint's readiness with the endpoint
listener (``test_endpoints.py``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from support import ANY_PORT, WAIT, ThreadResult, connect, run_in_thread
from txsocketserver._twisted import reactor as bridge
from txsocketserver._twisted.readiness import LINGER, SocketReadiness

#: Long enough for the reactor to have armed its watch; nothing is waited on with it.
NOTHING_COMES = 0.05


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(ANY_PORT)
        sock.listen(8)
        yield sock


def returned(running: ThreadResult) -> object:
    running.join(WAIT)
    assert running.error is None, running.error
    return running.value


def watched_by_reactor(fd: int) -> bool:
    readers = bridge.call_in_reactor(lambda: bridge.get_reactor().getReaders())
    return any(reader.fileno() == fd for reader in readers)


def test_a_queued_connection_is_ready_without_the_reactor(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        with connect(listening.getsockname()), connect(listening.getsockname()):
            # The kernel has them queued: even a zero timeout sees them, and
            # the reactor is never asked to watch.
            assert readiness.wait(WAIT)
            listening.accept()[0].close()
            assert readiness.wait(0)
            assert not watched_by_reactor(listening.fileno())
            listening.accept()[0].close()
    finally:
        readiness.close()


def test_nothing_queued_hands_the_watch_to_the_reactor(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        assert LINGER < NOTHING_COMES
        assert not readiness.wait(NOTHING_COMES)
        assert watched_by_reactor(listening.fileno())
        waiting = run_in_thread(readiness.wait, WAIT)
        with connect(listening.getsockname()):
            assert returned(waiting) is True
            # The reactor stopped watching: a busy server leaves the backlog alone.
            assert not watched_by_reactor(listening.fileno())
            listening.accept()[0].close()
    finally:
        readiness.close()


def test_wake_ends_a_wait_with_nothing_ready(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        assert not readiness.wait(NOTHING_COMES)
        waiting = run_in_thread(readiness.wait, None)
        readiness.wake()
        assert returned(waiting) is False
    finally:
        readiness.close()


def test_close_from_another_thread_makes_the_reactor_forget_the_socket(
    listening: socket.socket,
) -> None:
    readiness = SocketReadiness(listening.fileno())
    assert not readiness.wait(NOTHING_COMES)
    assert watched_by_reactor(listening.fileno())
    returned(run_in_thread(readiness.close))
    assert not watched_by_reactor(listening.fileno())
    readiness.close()  # idempotent
