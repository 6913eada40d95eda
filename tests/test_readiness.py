"""How a serving thread learns a request is waiting (``_twisted/readiness.py``).

``SocketReadiness`` on a real listening socket: the serving thread's own
``poll`` on the socket and a wake-up pipe, ``wake()`` for ``shutdown()``,
``close()`` from another thread, and descriptors back at baseline.  The
serving loop built on it is tested through the servers
(``test_stream_basic.py``, ``test_stream_lifecycle.py``); the endpoint's
readiness with the endpoint listener (``test_endpoints.py``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from support import ANY_PORT, WAIT, ThreadResult, connect, run_in_thread
from txsocketserver._twisted import reactor as bridge
from txsocketserver._twisted.readiness import SocketReadiness

#: A wait that nothing ends; nothing is waited on with it.
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


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_queued_connection_is_ready(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        with connect(listening.getsockname()), connect(listening.getsockname()):
            # The kernel has them queued: even a zero timeout sees them.
            assert readiness.wait(WAIT)
            listening.accept()[0].close()
            assert readiness.wait(0)
            listening.accept()[0].close()
            assert not readiness.wait(0)
    finally:
        readiness.close()


def test_an_idle_wait_leaves_the_socket_to_the_serving_thread(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        assert not readiness.wait(NOTHING_COMES)
        waiting = run_in_thread(readiness.wait, WAIT)
        with connect(listening.getsockname()):
            assert returned(waiting) is True
            # The reactor never watches it: a busy server leaves the backlog alone.
            assert not watched_by_reactor(listening.fileno())
            listening.accept()[0].close()
    finally:
        readiness.close()


def test_wake_ends_a_wait_with_nothing_ready(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        waiting = run_in_thread(readiness.wait, None)
        readiness.wake()
        assert returned(waiting) is False
        # The wake was taken: the next wait waits again.
        assert not readiness.wait(NOTHING_COMES)
    finally:
        readiness.close()


def test_a_wake_before_the_wait_ends_the_next_wait(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    try:
        readiness.wake()
        readiness.wake()
        assert readiness.wait(WAIT) is False
    finally:
        readiness.close()


def test_close_from_another_thread_wakes_the_serving_thread(listening: socket.socket) -> None:
    readiness = SocketReadiness(listening.fileno())
    before = open_fds()
    try:
        waiting = run_in_thread(readiness.wait, None)
        returned(run_in_thread(readiness.close))
        assert returned(waiting) is False
        # The socket left the set: the next wait says it was closed.
        with pytest.raises(OSError):
            readiness.wait(0)
        # A wake after another thread's close is harmless.
        readiness.wake()
    finally:
        readiness.close()  # the serving thread's own close ends it
    assert open_fds() == before - 2  # the pipe is closed
    readiness.close()  # idempotent
    readiness.wake()  # and a late wake writes nowhere


def test_a_socket_closed_under_the_wait_raises(listening: socket.socket) -> None:
    sock = socket.socket()
    sock.bind(ANY_PORT)
    sock.listen(1)
    readiness = SocketReadiness(sock.fileno())
    try:
        sock.close()
        with pytest.raises(OSError):
            readiness.wait(WAIT)
    finally:
        readiness.close()
