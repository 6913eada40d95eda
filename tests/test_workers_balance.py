"""``--workers``: how the workers share the connections of one listening socket.

``txsocketserver._workers.exclusive_accept``: on Linux each connection wakes
one waiting worker (``EPOLLEXCLUSIVE``), which then moves to the back of the
queue, so sequential connections at light load go to the workers in turn
instead of to whichever wakes first.  Observed here through real worker
processes' replies (their pids), and on the readiness itself with two serving
threads on one socket.  Every wait is bounded.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import LOCALHOST, WAIT, connect, wait_until
from test_twistd_cli import CLI, TCP, Spawn, spawn  # noqa: F401 - spawn: the fixture
from test_workers import _no_stray_workers, ask, wait_for_workers  # noqa: F401 - the fixture
from txsocketserver._twisted.readiness import ExclusiveSocketReadiness
from txsocketserver._workers import exclusive_accept

pytestmark = pytest.mark.skipif(
    not exclusive_accept.available(), reason="exclusive wake-ups are Linux's (>= 4.5)"
)

#: Sequential connections per test, and the fewest each of two workers must serve.
CONNECTIONS = 20
AT_LEAST = 8


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _idle(pids: set[int]) -> bool:
    """Whether no thread of these processes is running or runnable (all wait)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # a thread that just ended
            if state == "R":
                return False
    return True


def _ask_when_idle(address: object, workers: set[int]) -> int:
    """Light load: one connection, sent when every worker waits; who served it."""
    assert wait_until(lambda: _idle(workers), WAIT), "the workers stay busy"
    return _worker_of(ask(address), workers)


def _worker_of(reply: dict[str, object], workers: set[int]) -> int:
    """The worker that served *reply*: itself, or a forking worker's (child →
    template → worker)."""
    pid = int(reply["pid"])  # type: ignore[call-overload]
    if pid in workers:
        return pid
    template = int(reply["ppid"])  # type: ignore[call-overload]
    return template if template in workers else _parent(template)


@pytest.mark.parametrize(
    ("mode", "handler"),
    [
        ("sync", "worker_handlers:PidHandler"),
        ("threading", "worker_handlers:PidHandler"),
        ("forking", "worker_handlers:PidHandler"),
        ("async", "worker_handlers:AsyncPidHandler"),
    ],
)
def test_sequential_connections_go_to_the_workers_in_turn(
    spawn: Spawn,  # noqa: F811 - the fixture imported above
    mode: str,
    handler: str,
) -> None:
    # Light load: one client, one connection at a time, every worker idle
    # (waiting, none of its threads runnable) when it arrives.  Both are
    # woken, and the first back from its wait would take it: mostly the
    # same one.  Here each serves its share.
    mode_args = [] if mode == "async" else ["--mode", mode]
    server = spawn(
        *CLI, "--workers", "2", "--listen", TCP, "--handler", handler, *mode_args,
    )  # fmt: skip
    address = server.address()
    workers = wait_for_workers(server, 2)
    served = collections.Counter(_ask_when_idle(address, workers) for _ in range(CONNECTIONS))
    assert min(served[pid] for pid in workers) >= AT_LEAST, served
    assert server.stop() == 0
    assert "Traceback" not in server.output()


def test_reuse_port_workers_keep_their_own_sockets(
    spawn: Spawn,  # noqa: F811 - the fixture imported above
) -> None:
    # --reuse-port: each worker binds its own socket and the kernel hashes
    # connections over them; the exclusive wait is for the shared socket only.
    server = spawn(
        *CLI, "--workers", "2", "--listen", TCP, "--handler", "worker_handlers:PidHandler",
        "--mode", "threading", "--reuse-port",
    )  # fmt: skip
    address = server.address()
    workers = wait_for_workers(server, 2)
    served = {_worker_of(ask(address), workers) for _ in range(CONNECTIONS)}
    assert served <= workers and served
    assert server.stop() == 0


# -- the readiness itself, two serving threads on one socket ----------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def fds_at_baseline() -> Iterator[None]:
    """Every descriptor a readiness opens is closed again.

    A readiness holds the reactor (as ``SocketReadiness`` does), whose own
    descriptors stay open once it exists: the baseline is taken after one.
    """
    with socket.socket() as sock:
        ExclusiveSocketReadiness(sock.fileno()).close()
    before = _open_fds()
    yield
    assert _open_fds() == before


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind((LOCALHOST, 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


class _ServingThread:
    """A serving loop of its own on the shared socket: wait, accept, note, close."""

    def __init__(self, name: str, sock: socket.socket, served: list[str]) -> None:
        self.name = name
        self._sock = sock
        self._served = served
        self._stop = False
        self.readiness: ExclusiveSocketReadiness | None = None
        self.waiting = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def sleeping(self) -> bool:
        """Whether the thread waits in ``epoll_wait`` (where the kernel shows it)."""
        task = Path(f"/proc/self/task/{self._thread.native_id}")
        wchan = (task / "wchan").read_text()
        if wchan in ("", "0"):  # hidden: at least not running
            return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "R"
        return "epoll" in wchan or wchan == "ep_poll"

    def _run(self) -> None:
        self.readiness = ExclusiveSocketReadiness(self._sock.fileno())
        try:
            self.waiting.set()
            while not self._stop:
                if not self.readiness.wait(WAIT):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except BlockingIOError:
                    continue  # the other thread took it
                self._served.append(self.name)
                conn.sendall(self.name.encode())
                conn.close()
        finally:
            self.readiness.close()

    def stop(self) -> None:
        self._stop = True
        assert self.readiness is not None
        self.readiness.wake()
        self._thread.join(WAIT)
        assert not self._thread.is_alive()


def test_two_serving_threads_on_one_socket_take_turns(
    listening: socket.socket, fds_at_baseline: None
) -> None:
    served: list[str] = []
    threads = [_ServingThread(name, listening, served) for name in ("a", "b")]
    try:
        for thread in threads:
            assert thread.waiting.wait(WAIT)
        for _ in range(CONNECTIONS):
            # Each connection when both threads wait in their readiness.
            assert wait_until(lambda: all(thread.sleeping() for thread in threads), WAIT)
            with connect(listening.getsockname()) as client:
                assert client.recv(1) in (b"a", b"b")
    finally:
        for thread in threads:
            thread.stop()
    counts = collections.Counter(served)
    assert sum(counts.values()) == CONNECTIONS
    assert min(counts["a"], counts["b"]) >= AT_LEAST, counts


def test_wake_ends_a_wait_without_a_request(listening: socket.socket) -> None:
    readiness = ExclusiveSocketReadiness(listening.fileno())
    try:
        readiness.wake()
        assert readiness.wait(WAIT) is False
        # Nothing left over: the next wait sees the request, not the wake-up.
        with connect(listening.getsockname()):
            assert readiness.wait(WAIT) is True
            listening.accept()[0].close()
    finally:
        readiness.close()


def test_close_from_another_thread_wakes_the_serving_thread(
    listening: socket.socket, fds_at_baseline: None
) -> None:
    outcome: list[object] = []
    waiting = threading.Event()

    def serve() -> None:
        readiness = ExclusiveSocketReadiness(listening.fileno())
        holder.append(readiness)
        waiting.set()
        try:
            outcome.append(readiness.wait(None))  # woken by close()
            try:
                readiness.wait(None)
            except OSError as exc:
                outcome.append(exc.errno)
        finally:
            readiness.close()

    holder: list[ExclusiveSocketReadiness] = []
    thread = threading.Thread(target=serve)
    thread.start()
    assert waiting.wait(WAIT)
    holder[0].close()  # server_close() from another thread
    holder[0].wake()  # as _stop_watching does: harmless after close
    thread.join(WAIT)
    assert not thread.is_alive()
    assert outcome == [False, errno.EBADF]


def test_the_listening_socket_is_registered_exclusively(listening: socket.socket) -> None:
    # What the kernel holds (the set's fdinfo lists each entry's events).
    readiness = ExclusiveSocketReadiness(listening.fileno())
    try:
        epfd = readiness._poller.fileno()
        entries = {}
        for line in Path(f"/proc/self/fdinfo/{epfd}").read_text().splitlines():
            words = line.split()
            if words[:1] == ["tfd:"]:
                entries[int(words[1])] = int(words[3], 16)
        assert entries[listening.fileno()] & select.EPOLLEXCLUSIVE
        assert len(entries) == 2  # and the wake-up pipe
    finally:
        readiness.close()
