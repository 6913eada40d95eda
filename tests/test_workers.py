"""``--workers N``: several processes serving one listening socket, supervised.

Ours only (the stdlib has no workers): real supervisor processes started as
operators start them, real worker processes, real clients; the workers' pids
come from the supervisor's log and from the handler's replies.  Every wait
is bounded; every process is killed in a finalizer.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import (
    LOCALHOST,
    WAIT,
    SelfSignedCert,
    connect,
    recv_line,
    systemd_activation,
    wait_until,
)
from test_twistd_cli import (  # noqa: F401 - spawn: the fixture
    CLI,
    TCP,
    TWISTD,
    ServerProcess,
    Spawn,
    spawn,
    tls_endpoint,
)

#: Starting a worker imports Twisted and the handler: slow on a loaded machine.
START = 30.0
READY = re.compile(r"<worker (\d+) generation (\d+)> ready")
GONE = re.compile(r"<worker (\d+) generation \d+> (?:exited|died)")
PID_HANDLER = "worker_handlers:PidHandler"


def ready_workers(server: ServerProcess, generation: int | None = None) -> set[int]:
    """Pids of the workers the supervisor logged as ready and not yet gone."""
    output = server.output()
    gone = {int(pid) for pid in GONE.findall(output)}
    return {
        int(pid)
        for pid, gen in READY.findall(output)
        if int(pid) not in gone and (generation is None or int(gen) == generation)
    }


def wait_for_workers(
    server: ServerProcess, count: int, generation: int | None = None, timeout: float = START
) -> set[int]:
    ok = wait_until(lambda: len(ready_workers(server, generation)) == count, timeout)
    assert ok, f"not {count} workers ready:\n{server.output()}"
    return ready_workers(server, generation)


def ask(address: object, line: bytes = b"hi\n") -> dict[str, object]:
    """One request on a new connection: the handler's JSON reply."""
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET  # type: ignore[index]
    with socket.socket(family) as client:
        client.settimeout(WAIT)
        client.connect(address)
        client.sendall(line)
        return json.loads(recv_line(client))


def pids_of_two_connections(address: tuple[str, int]) -> set[int]:
    """The pids serving two connections open at once.

    A synchronous worker serves one connection at a time: while the first
    connection holds one worker (its handler waits for the next line), the
    second one must be another worker's.
    """
    with connect(address) as first, connect(address) as second:
        first.sendall(b"hi\n")
        first_pid = json.loads(recv_line(first))["pid"]
        second.sendall(b"hi\n")
        return {first_pid, json.loads(recv_line(second))["pid"]}


@dataclass
class Load:
    """Clients sending requests back to back, each on a new connection, until stopped."""

    address: tuple[str, int]
    clients: int = 2
    replies: list[dict[str, object]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        # Bounded: a load that never stops would outlive a failed test.
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.replies.append(ask(self.address))
            except (OSError, ValueError) as exc:
                self.failures.append(exc)

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2 * WAIT)
            assert not thread.is_alive()

    def wait_for_replies(self, count: int) -> None:
        target = len(self.replies) + count
        assert wait_until(lambda: len(self.replies) >= target, 2 * WAIT), self.failures

    def pids(self, since: int = 0) -> set[int]:
        return {int(reply["pid"]) for reply in self.replies[since:]}  # type: ignore[call-overload]


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    """test_twistd_cli's process starter (its finalizer kills what it started)."""
    return spawn


def start(cli: Spawn, *args: str, workers: int = 2, **kwargs: object) -> ServerProcess:
    return cli(
        *CLI, "--workers", str(workers), "--listen", TCP, "--handler", PID_HANDLER, *args,
        **kwargs,
    )  # fmt: skip


def test_workers_serve_one_port(cli: Spawn) -> None:
    server = start(cli, "--mode", "sync")
    address = server.address()
    pids = wait_for_workers(server, 2)
    assert pids_of_two_connections(address) == pids
    assert os.getpid() not in pids and server.process.pid not in pids
    assert server.stop() == 0
    assert "Traceback" not in server.output()


def test_killed_worker_is_replaced_and_no_client_is_refused(cli: Spawn) -> None:
    server = start(cli, "--mode", "threading")
    address = server.address()
    pids = wait_for_workers(server, 2)
    victim = min(pids)
    with Load(address) as load:
        load.wait_for_replies(20)
        os.kill(victim, signal.SIGKILL)
        server.wait_for(re.compile(rf"<worker {victim} generation 0> died"), timeout=WAIT)
        new = wait_for_workers(server, 2, timeout=START) - pids
        assert len(new) == 1, server.output()
        before = len(load.replies)
        assert wait_until(lambda: new & load.pids(before), 2 * WAIT), server.output()
    refused = [f for f in load.failures if isinstance(f, ConnectionRefusedError)]
    assert refused == []
    # Only a request that the killed worker was running at that moment may fail.
    assert len(load.failures) <= load.clients, load.failures
    assert f"<worker {victim} generation 0> died (signal SIGKILL); replacing it" in server.output()
    assert server.stop() == 0


def test_sighup_reloads_with_zero_failed_requests(cli: Spawn, tmp_path: Path) -> None:
    version = tmp_path / "version"
    version.write_text("v1")
    env = {"WORKER_TEST_VERSION_FILE": str(version)}
    with _environment(env):
        server = start(cli, "--mode", "threading", "--drain-timeout", "5")
    address = server.address()
    old = wait_for_workers(server, 2, generation=0)
    with Load(address) as load:
        load.wait_for_replies(20)
        assert {reply["version"] for reply in load.replies} == {"v1"}
        version.write_text("v2")
        server.process.send_signal(signal.SIGHUP)
        new = wait_for_workers(server, 2, generation=1)
        assert wait_until(lambda: not (ready_workers(server) & old)), server.output()
        before = len(load.replies)
        load.wait_for_replies(20)
    assert load.failures == []
    assert load.pids(before) <= new and not new & old
    assert {reply["version"] for reply in load.replies[before:]} == {"v2"}
    assert "SIGHUP: starting new workers, then draining the old ones" in server.output()
    assert server.stop() == 0


def test_sigterm_lets_requests_in_flight_finish_and_exits_0(cli: Spawn) -> None:
    server = start(cli, "--mode", "sync")
    address = server.address()
    wait_for_workers(server, 2)
    with connect(address) as client:
        client.sendall(b"hi\n")
        pid = json.loads(recv_line(client))["pid"]
        client.sendall(b"sleep 0.5\n")
        server.process.send_signal(signal.SIGTERM)
        reply = json.loads(recv_line(client))
    assert reply["pid"] == pid
    assert server.finish() == 0
    assert "SIGTERM: stopping" in server.output()
    assert "all workers stopped" in server.output()
    with pytest.raises(ConnectionRefusedError):
        connect(address).close()


def test_sigttin_adds_and_sigttou_removes_a_worker(cli: Spawn) -> None:
    server = start(cli, "--mode", "sync", workers=1)
    address = server.address()
    (first,) = wait_for_workers(server, 1)
    server.process.send_signal(signal.SIGTTIN)
    two = wait_for_workers(server, 2)
    with connect(address) as held:
        held.sendall(b"hi\n")
        held_pid = json.loads(recv_line(held))["pid"]
        assert ask(address)["pid"] == (two - {held_pid}).pop()
    server.process.send_signal(signal.SIGTTOU)
    server.wait_for(re.compile(r"exited \(status 0\)"), timeout=WAIT)
    (left,) = wait_for_workers(server, 1)
    assert left == (two - {first}).pop()  # as gunicorn does, the oldest worker goes
    assert ask(address)["pid"] == left
    assert server.stop() == 0


def test_max_requests_recycles_workers(cli: Spawn) -> None:
    server = start(cli, "--mode", "sync", "--max-requests", "3")
    address = server.address()
    wait_for_workers(server, 2)
    replies = [ask(address) for _ in range(14)]
    served = collections.Counter(reply["pid"] for reply in replies)
    # A worker takes no request after its third: 14 requests, at least five
    # workers (more when the kernel hands a connection to a fresh worker
    # while an older one still has requests left).
    assert max(served.values()) == 3 and len(served) >= 5, served
    assert sum(served.values()) == 14
    assert "reached --max-requests; replacing it" in server.output()
    assert server.stop() == 0


def test_worker_stuck_beyond_worker_timeout_is_replaced(cli: Spawn) -> None:
    server = start(cli, "--mode", "sync", "--worker-timeout", "1", workers=1)
    address = server.address()
    (stuck,) = wait_for_workers(server, 1)
    with connect(address) as client:
        client.sendall(b"hi\nsleep 60\n")
        assert json.loads(recv_line(client))["pid"] == stuck
        server.wait_for(re.compile(rf"<worker {stuck} .*made no progress"), timeout=WAIT)
        server.wait_for(re.compile(rf"<worker {stuck} .*exited \(signal SIGKILL\)"), WAIT)
        (fresh,) = wait_for_workers(server, 1)
        assert fresh != stuck
        assert ask(address)["pid"] == fresh
    # The worker logged its threads' stacks first: where it was stuck.
    assert "in handle" in server.output()
    assert server.stop() == 0


def test_worker_dying_at_start_is_restarted_with_backoff(cli: Spawn, tmp_path: Path) -> None:
    crash = tmp_path / "crash"
    with _environment({"WORKER_TEST_CRASH_FILE": str(crash)}):
        server = start(cli, "--mode", "sync", workers=1)
    address = server.address()
    (first,) = wait_for_workers(server, 1)
    crash.touch()
    os.kill(first, signal.SIGKILL)
    server.wait_for(re.compile(r"died before it was ready .*next start in 0.5s"), timeout=START)
    crash.unlink()
    (fresh,) = wait_for_workers(server, 1)
    assert ask(address)["pid"] == fresh
    assert "next start in 0.25s" in server.output()
    assert server.stop() == 0


def test_reload_with_broken_code_keeps_the_old_workers(cli: Spawn, tmp_path: Path) -> None:
    crash = tmp_path / "crash"
    with _environment({"WORKER_TEST_CRASH_FILE": str(crash)}):
        server = start(cli, "--mode", "threading", workers=1)
    address = server.address()
    (old,) = wait_for_workers(server, 1, generation=0)
    crash.touch()
    server.process.send_signal(signal.SIGHUP)
    server.wait_for(re.compile(r"generation 1> died before it was ready"), timeout=START)
    assert "crash file present: this worker dies at start" in server.output()
    assert "died before it was ready (status 3: boot error)" in server.output()
    assert ask(address)["pid"] == old
    crash.unlink()
    (new,) = wait_for_workers(server, 1, generation=1)
    server.wait_for(re.compile(rf"<worker {old} generation 0> exited"), timeout=WAIT)
    assert ask(address)["pid"] == new
    assert server.stop() == 0


def test_reuse_port_workers_each_bind_the_port(cli: Spawn) -> None:
    server = start(cli, "--mode", "threading", "--reuse-port")
    address = server.address()
    pids = wait_for_workers(server, 2)
    # The kernel picks a socket by hashing each connection's addresses: many
    # connections reach both workers.
    seen = {ask(address)["pid"] for _ in range(40)}
    assert seen == pids
    assert server.stop() == 0


def test_several_listen_options_serve_several_sockets(cli: Spawn, tmp_path: Path) -> None:
    path = str(tmp_path / "workers.sock")
    server = start(cli, "--mode", "threading", "--listen", f"unix:{path}")
    address = server.address()
    pids = wait_for_workers(server, 2)
    assert ask(address)["pid"] in pids
    unix_reply = ask(path)
    assert unix_reply["pid"] in pids
    assert server.stop() == 0
    assert not os.path.exists(path)


def test_tcp6_workers(cli: Spawn) -> None:
    server = cli(
        *CLI, "--workers", "2", "--listen", r"tcp6:0:interface=\:\:1", "--handler", PID_HANDLER,
    )  # fmt: skip
    host, port = server.address()
    assert host == "[::1]"
    pids = wait_for_workers(server, 2)
    reply = ask(("::1", port))
    assert reply["pid"] in pids and reply["client"][0] == "::1"
    assert server.stop() == 0


def test_forking_workers(cli: Spawn) -> None:
    server = start(cli, "--mode", "forking")
    address = server.address()
    workers = wait_for_workers(server, 2)
    # Each request runs in a child forked from its worker's template process.
    pids = {ask(address)["pid"] for _ in range(4)}
    assert len(pids) == 4 and not pids & workers
    assert server.stop() == 0


def test_async_workers(cli: Spawn) -> None:
    # An async handler class: each worker serves it on its own reactor thread.
    server = cli(
        *CLI, "--workers", "2", "--listen", TCP, "--handler", "worker_handlers:AsyncPidHandler",
    )  # fmt: skip
    address = server.address()
    workers = wait_for_workers(server, 2)
    with Load(address, clients=4) as load:
        load.wait_for_replies(40)
    assert not load.failures
    assert load.pids() == workers
    assert server.stop() == 0


def test_tls_workers(cli: Spawn, tls_cert: SelfSignedCert) -> None:
    server = cli(
        *CLI, "--workers", "2", "--listen", tls_endpoint(tls_cert), "--handler", PID_HANDLER,
    )  # fmt: skip
    address = server.address()
    pids = wait_for_workers(server, 2)
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with (
        connect(address) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as client,
    ):
        client.sendall(b"hi\n")
        assert json.loads(recv_line(client))["pid"] in pids
    assert server.stop() == 0


def test_systemd_socket_shared_by_workers(cli: Spawn) -> None:
    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        fd = listening.fileno()
        server = cli(
            *systemd_activation(fd), "--workers", "2", "--mode", "sync",
            "--listen", "systemd:domain=INET:index=0", "--handler", PID_HANDLER,
            pass_fds=(fd,),
        )  # fmt: skip
        pids = wait_for_workers(server, 2)
        address = listening.getsockname()
        assert pids_of_two_connections(address) == pids
        assert server.stop() == 0


def test_workers_leave_when_the_supervisor_is_killed(cli: Spawn) -> None:
    server = start(cli, "--mode", "threading")
    pids = wait_for_workers(server, 2)
    server.process.kill()
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), 2 * WAIT), server.output()
    assert server.output().count("the supervisor is gone; stopping") == 2


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_twistd_runs_workers(cli: Spawn) -> None:
    server = cli(
        *TWISTD, "-n", "--pidfile=", "--logfile=-", "socketserver", "--workers", "2",
        "--listen", TCP, "--handler", PID_HANDLER, "--mode", "sync",
    )  # fmt: skip
    address = server.address()
    pids = wait_for_workers(server, 2)
    assert pids_of_two_connections(address) == pids
    server.process.send_signal(signal.SIGHUP)
    wait_for_workers(server, 2, generation=1)
    assert server.stop() in (0, -signal.SIGTERM)
    assert "all workers stopped" in server.output()


def _make_local() -> type:
    class Local:
        pass

    return Local


_Local = _make_local()


LIBRARY_PROGRAM = """
from twisted.internet.defer import Deferred
from twisted.internet.task import react

import txsocketserver
from worker_handlers import PidHandler


def main(reactor):
    started = txsocketserver.start_workers(
        PidHandler, "tcp:0:interface=127.0.0.1", workers=2, mode="sync"
    )

    def serving(workers):
        reactor.addSystemEventTrigger("before", "shutdown", workers.stopService)
        host, port = workers.addresses[0]
        print(f"pids {sorted(workers.pids)} at {host}:{port} (", flush=True)

    started.addCallback(serving)
    return Deferred()


react(main)
"""


def test_library_start_workers_from_a_twisted_program(cli: Spawn) -> None:
    program = cli(sys.executable, "-c", LIBRARY_PROGRAM)
    address = program.address()
    pids = {
        int(pid) for pid in re.findall(r"\d+", program.wait_for(re.compile(r"pids \[.*\]"))[0])
    }
    assert len(pids) == 2
    assert pids_of_two_connections(address) == pids
    assert program.stop() == 0
    # Both workers drained (their own log lines) before the program exited.
    assert program.output().count("(drained)") == 2, program.output()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"mode": "bogus"}, ValueError,
         "mode 'bogus': choose one of sync, threading, forking, async"),
        ({"workers": 0}, ValueError, "workers must be at least 1"),
        ({"listen": "bogus:1"}, ValueError, "Unknown endpoint type: 'bogus'"),
        ({"listen": "tcp:0:interface=127.0.0.1", "reuse_port": True, "handler": _Local},
         TypeError, "define it at the top level of an importable module"),
    ],
)  # fmt: skip
def test_library_errors(kwargs: dict[str, object], error: type, message: str) -> None:
    # Ours only: argument checks before any socket or process exists.
    from txsocketserver import Workers

    arguments: dict[str, object] = {"handler": PID_HANDLER, "listen": TCP, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        Workers(**arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reuse-port"], "--reuse-port need(s) --workers N"),
        (["--listen", "tcp:0", "--listen", "tcp:0"], "several --listen need(s) --workers N"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "2", "--reuse-port", "--listen", "unix:/tmp/x.sock"],
         "--reuse-port needs tcp:, tcp6: or ssl:"),
        (["--workers", "2", "--listen", "tcp:0", "--worker-timeout", "0"],
         "--worker-timeout must be positive"),
    ],
)  # fmt: skip
def test_clear_errors(cli: Spawn, args: list[str], message: str) -> None:
    if "--listen" not in args:
        args = ["--listen", TCP, *args]
    process = cli(*CLI, "--handler", PID_HANDLER, *args)
    assert process.finish() == 2
    assert message in process.output()
    assert "Traceback" not in process.output()


@pytest.fixture(autouse=True)
def _no_stray_workers() -> Iterator[None]:
    yield
    # spawn's finalizer killed the supervisors; their workers see the
    # supervisor pipe close and leave by themselves.
    assert wait_until(lambda: not _worker_processes(), 2 * WAIT), _worker_processes()


def _worker_processes() -> list[int]:
    """Pids of worker processes whose parent is this test process's child."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if b"txsocketserver._workers.worker" not in cmdline:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == 1 or _is_child_of_us(parent):
            found.append(int(entry.name))
    return found


def _is_child_of_us(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid()


class _environment:
    """Set environment variables for the processes started inside the block."""

    def __init__(self, values: dict[str, str]) -> None:
        self._values = values
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> None:
        for name, value in self._values.items():
            self._saved[name] = os.environ.get(name)
            os.environ[name] = value

    def __exit__(self, *exc: object) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
