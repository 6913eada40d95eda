"""Worker lifecycle under ``--workers``: the exact ``--worker-timeout``, memory and
lifetime limits, a rolling reload, SIGUSR1 and ``--log-file``.

Real supervisors and workers, real clients; times measured at the client.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support import WAIT, wait_until
from test_twistd_cli import CLI, TCP, ServerProcess, Spawn, spawn  # noqa: F401 - the fixture
from test_workers import START, Load, ask, ready_workers, wait_for_workers
from txsocketserver._workers.supervisor import beat_interval

LINES = "lifecycle_handlers:LineHandler"
#: What scheduling on a loaded 2-core machine may add to the stated margin.
SCHEDULING = 0.5


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    """test_twistd_cli's process starter (its finalizer kills what it started)."""
    return spawn


def start(cli: Spawn, *args: str, workers: int = 1, handler: str = LINES) -> ServerProcess:
    return cli(*CLI, "--workers", str(workers), "--listen", TCP, "--handler", handler, *args)


def timed_request(address: tuple[str, int], line: bytes) -> tuple[float, bytes]:
    """Send *line* on a new connection: (seconds until the reply or the close, reply)."""
    with socket.create_connection(address, timeout=60) as client:
        began = time.monotonic()
        client.sendall(line)
        reply = b""
        while not reply.endswith(b"\n"):
            try:
                chunk = client.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                break
            reply += chunk
        return time.monotonic() - began, reply


@pytest.mark.parametrize(
    ("handler", "how"),
    [
        (LINES, "serving loop"),  # a sync worker's loop is stuck in one request
        ("lifecycle_handlers:ReactorBlockingHandler", "reactor"),  # its reactor is
    ],
)
def test_a_worker_without_progress_for_the_timeout_is_replaced_within_the_margin(
    cli: Spawn, handler: str, how: str
) -> None:
    timeout = 2.0
    mode = ["--mode", "sync"] if handler == LINES else []
    server = start(cli, "--worker-timeout", str(timeout), *mode, handler=handler)
    address = server.address()
    (stuck,) = wait_for_workers(server, 1)
    # 1.25 x the timeout: today's rule let such a request finish, then killed
    # the worker in its next one; the stall itself must be acted on.
    took, reply = timed_request(address, f"sleep {1.25 * timeout}\n".encode())
    assert reply == b"", "the stuck request was not cut off"
    assert timeout <= took <= timeout + beat_interval(timeout) + SCHEDULING, took
    output = server.wait_for(re.compile(rf"<worker {stuck} generation 0> exited.*"), WAIT)
    assert output
    log = server.output()
    # Where it was stuck, before it was killed: every thread's stack.
    assert "lifecycle_handlers.py" in log and "in handle" in log, log
    if how == "reactor":
        assert f"<worker {stuck} generation 0> missed its heartbeat for 2.0s" in log
    else:
        assert re.search(r"a serving loop made no progress for 2\.\d+s", log), log
        assert f"<worker {stuck} generation 0> made no progress" in log
    (replacement,) = wait_for_workers(server, 1)
    assert replacement != stuck
    assert ask(address)["pid"] == replacement
    assert server.stop() == 0


@pytest.mark.parametrize("handler", [LINES, "lifecycle_handlers:ReactorBlockingHandler"])
def test_a_worker_that_made_progress_since_a_stall_is_never_killed_for_it(
    cli: Spawn, handler: str
) -> None:
    timeout = 2.0
    mode = ["--mode", "sync"] if handler == LINES else []
    server = start(cli, "--worker-timeout", str(timeout), *mode, handler=handler)
    address = server.address()
    (pid,) = wait_for_workers(server, 1)
    # Stalls of 0.75 x the timeout back to back: more than the timeout in
    # all, with progress between them.
    for _ in range(4):
        took, reply = timed_request(address, f"sleep {0.75 * timeout}\n".encode())
        assert reply.startswith(b'{"pid": %d' % pid), (reply, server.output())
    for _ in range(3):
        assert timed_request(address, b"hi\n")[1].startswith(b'{"pid": %d' % pid)
    log = server.output()
    assert "no progress" not in log and "missed its heartbeat" not in log, log
    assert ready_workers(server) == {pid}
    assert server.stop() == 0


def test_max_worker_memory_replaces_a_worker_after_its_replacement_is_ready(
    cli: Spawn,
) -> None:
    server = start(cli, "--max-worker-memory", "150", "--mode", "threading")
    address = server.address()
    (big,) = wait_for_workers(server, 1)
    with Load(address, clients=2) as load:
        load.wait_for_replies(10)
        with socket.create_connection(address, timeout=WAIT) as client:
            client.sendall(b"grow 200\n")
            assert client.recv(100).startswith(b'{"pid": %d' % big)
        server.wait_for(re.compile(rf"<worker {big} generation 0> uses \d+ MB, over "
                                   r"--max-worker-memory: replacing it"), WAIT)  # fmt: skip
        exited = server.wait_for(re.compile(rf"<worker {big} generation 0> exited \(status 0\)"),
                                 START)  # fmt: skip
        assert exited
        (new,) = wait_for_workers(server, 1)
        before = len(load.replies)
        assert wait_until(lambda: new in load.pids(before), WAIT)
    assert load.failures == []  # it drained; its successor was serving already
    log = server.output()
    assert log.index(f"<worker {new} generation 0> ready") < log.index(
        f"stopping <worker {big} generation 0> (replaced)"
    )
    assert server.stop() == 0


def test_max_worker_lifetime_with_jitter(cli: Spawn) -> None:
    server = start(cli, "--max-worker-lifetime", "2", "--max-worker-lifetime-jitter", "1",
                   "--mode", "threading", workers=2)  # fmt: skip
    address = server.address()
    first = wait_for_workers(server, 2)
    began = time.monotonic()
    with Load(address) as load:
        ok = wait_until(lambda: not (ready_workers(server) & first), START)
        assert ok, server.output()
        load.wait_for_replies(5)
    assert load.failures == []
    # Replaced after 2 s plus 0..1 s of jitter (plus the check's half second).
    assert time.monotonic() - began >= 2.0
    retired = re.findall(r"generation 0> has served (\d+\.\d)s, its lifetime", server.output())
    assert len(retired) >= 2, server.output()
    assert all(2.0 <= float(s) <= 3.0 + 0.5 + SCHEDULING for s in retired[:2]), retired
    assert server.stop() == 0


def test_reload_drains_an_old_worker_only_once_a_new_one_serves(
    cli: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = tmp_path / "slow-start"
    monkeypatch.setenv("LIFECYCLE_SLOW_START_FILE", str(slow))
    server = start(cli, "--mode", "threading", workers=2)
    address = server.address()
    old = wait_for_workers(server, 2, generation=0)
    slow.touch()  # the first new worker to import the handler takes 4 s more
    with Load(address) as load:
        load.wait_for_replies(10)
        server.process.send_signal(signal.SIGHUP)
        wait_for_workers(server, 2, generation=1, timeout=START)
        assert wait_until(lambda: not (ready_workers(server) & old), START)
        load.wait_for_replies(10)
    assert load.failures == []
    log = server.output()
    ready = [m.start() for m in re.finditer(r"generation 1> ready", log)]
    stopped = [m.start() for m in re.finditer(r"generation 0> \(replaced\)", log)]
    assert len(ready) == 2 and len(stopped) == 2, log
    # One old worker drained as soon as the first new one served, the other
    # only once the slow one did.
    assert ready[0] < stopped[0] < ready[1] < stopped[1], log
    assert server.stop() == 0


def test_sigusr1_reopens_the_log_file_of_the_supervisor_and_its_workers(
    cli: Spawn, tmp_path: Path
) -> None:
    log = tmp_path / "app.log"
    server = start(cli, "--log-file", str(log), "--mode", "threading", workers=2)
    assert wait_until(lambda: log.exists() and len(re.findall("ready", log.read_text())) == 2,
                      START), server.output()  # fmt: skip
    address = tuple_address(log.read_text())
    assert server.output() == ""  # everything went to the file
    rotated = tmp_path / "app.log.1"
    log.rename(rotated)  # what logrotate does
    server.process.send_signal(signal.SIGUSR1)
    assert wait_until(log.exists, WAIT)
    # Both workers write to the new file (each says so in a request of its own).
    said: set[int] = set()
    deadline = time.monotonic() + START
    while len(said) < 2 and time.monotonic() < deadline:
        said.add(ask(address, b"say hello\n")["pid"])  # type: ignore[arg-type]
    assert wait_until(
        lambda: all(f"{pid} says hello" in log.read_text() for pid in said), WAIT
    ), log.read_text()
    assert "says hello" not in rotated.read_text()
    server.process.send_signal(signal.SIGTTIN)  # a supervisor line
    assert wait_until(lambda: "SIGTTIN" in log.read_text(), WAIT)
    assert server.stop() == 0
    assert "all workers stopped" in log.read_text()


def test_sigusr1_reopens_the_log_file_of_a_single_process(cli: Spawn, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    server = cli(*CLI, "--listen", TCP, "--handler", LINES, "--log-file", str(log))
    assert wait_until(lambda: log.exists() and " at " in log.read_text(), START)
    address = tuple_address(log.read_text())
    log.rename(tmp_path / "app.log.1")
    server.process.send_signal(signal.SIGUSR1)
    assert wait_until(log.exists, WAIT)
    ask(address, b"say again\n")
    assert wait_until(lambda: "says again" in log.read_text(), WAIT)
    assert server.stop() == 0
    assert "SIGTERM: stopping" in log.read_text()


def tuple_address(text: str) -> tuple[str, int]:
    match = re.search(r" at (\S+):(\d+) \(", text)
    assert match, text
    return match.group(1), int(match.group(2))


def test_lifecycle_options_need_workers_and_sane_values(cli: Spawn) -> None:
    for args, message in [
        (["--max-worker-memory", "100"], "--max-worker-memory need(s) --workers N"),
        (["--workers", "1", "--max-worker-lifetime", "0"], "--max-worker-lifetime must be"),
        (["--workers", "1", "--max-worker-lifetime-jitter", "-1"], "must not be negative"),
    ]:
        server = cli(*CLI, "--listen", TCP, "--handler", LINES, *args)
        assert server.finish() == 2
        assert message in server.output(), server.output()



@pytest.mark.skipif(shutil.which("logrotate") is None and not Path("/usr/sbin/logrotate").exists(),
                    reason="Debian's logrotate (.ci/run installs it)")  # fmt: skip
def test_logrotate_with_the_stanza_of_the_docs(cli: Spawn, tmp_path: Path) -> None:
    """The operations guide's logrotate stanza, run by logrotate itself (forced)."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    match = re.search(r"```\n(/var/log/myapp/server.log \{.*?\})\n```", docs, re.DOTALL)
    assert match, "no logrotate stanza in docs/operations.md"
    log = tmp_path / "server.log"
    server = start(cli, "--log-file", str(log), "--mode", "threading", workers=2)
    assert wait_until(lambda: log.exists() and log.read_text().count("ready") == 2, START)
    address = tuple_address(log.read_text())
    # systemctl stands for systemd here: the same signal, sent by kill.
    stanza = match.group(1).replace("/var/log/myapp/server.log", str(log)).replace(
        "systemctl kill --signal=SIGUSR1 --kill-whom=main myapp.service",
        f"kill -USR1 {server.process.pid}",
    )
    config = tmp_path / "logrotate.conf"
    config.write_text(stanza + "\n")
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    result = subprocess.run(
        [logrotate, "--force", "--state", str(tmp_path / "state"), str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rotated = tmp_path / "server.log.1"
    assert rotated.exists() and "ready" in rotated.read_text()
    assert wait_until(log.exists, WAIT)
    pids: set[int] = set()
    deadline = time.monotonic() + START
    while len(pids) < 2 and time.monotonic() < deadline:
        pids.add(ask(address, b"say rotated\n")["pid"])  # type: ignore[arg-type]
    assert wait_until(lambda: log.read_text().count("says rotated") >= 2, WAIT)
    assert "says rotated" not in rotated.read_text()
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_worker_memory": 0}, "max_worker_memory must be positive"),
        ({"max_worker_lifetime": -1}, "max_worker_lifetime must be positive"),
        ({"max_worker_lifetime_jitter": -1}, "max_worker_lifetime_jitter must not be negative"),
    ],
)
def test_library_lifecycle_errors(kwargs: dict[str, float], message: str) -> None:
    from txsocketserver import Workers

    with pytest.raises(ValueError, match=message):
        Workers(LINES, TCP, **kwargs)  # type: ignore[arg-type]
