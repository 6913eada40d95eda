"""systemd: the notification protocol, the watchdog, socket activation, the unit file.

The tests play systemd's part for real: they bind the datagram socket that
``NOTIFY_SOCKET`` names (a path, or an ``@`` name in the abstract namespace)
and read what the server sends; socket activation goes through Debian's
``systemd-socket-activate``; the unit file of docs/operations.md goes through
``systemd-analyze verify``.  No PID 1 is needed for any of it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import LOCALHOST, WAIT, recv_line
from test_twistd_cli import (  # noqa: F401 - spawn: the fixture
    CLI,
    REPO,
    TCP,
    TWISTD,
    ServerProcess,
    Spawn,
    spawn,
)
from test_workers import START, ask, wait_for_workers

DOCS = REPO / "docs" / "operations.md"


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    """test_twistd_cli's process starter (its finalizer kills what it started)."""
    return spawn


class NotifySocket:
    """systemd's end of ``NOTIFY_SOCKET``: every datagram received, in order.

    A thread reads the socket all along, as systemd does: the kernel queues
    only a few datagrams on a Unix socket, and the server's sends never block.
    """

    def __init__(self, address: str) -> None:
        self.name = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []
        self._arrived = threading.Condition()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._arrived:
                self.messages.append(message)
                self._arrived.notify_all()

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = START, after: int = -1
    ) -> int:
        """Index of the first message after index *after* that sets *key* (to *value*)."""

        def found() -> int | None:
            for index, message in enumerate(self.messages):
                if index > after and key in message and value in (None, message[key]):
                    return index
            return None

        with self._arrived:
            if not self._arrived.wait_for(lambda: found() is not None, timeout):
                raise AssertionError(f"no {key}={value} after {after} in {self.messages}")
        index = found()
        assert index is not None
        return index

    def count(self) -> int:
        with self._arrived:
            return len(self.messages)

    def keys(self) -> list[str]:
        with self._arrived:
            return [key for message in self.messages for key in message]

    def close(self) -> None:
        self._closing.set()
        self._reader.join(WAIT)
        self.sock.close()


@pytest.fixture
def notify(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifySocket]:
    """A NOTIFY_SOCKET for the processes the test starts: a path, or (indirect
    parameter "abstract") a name in the abstract namespace."""
    if getattr(request, "param", "path") == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@txsocketserver-test-{os.getpid()}-{time.monotonic_ns()}"
    receiver = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield receiver
    receiver.close()


@pytest.mark.parametrize("notify", ["path", "abstract"], indirect=True)
def test_workers_notify_ready_reloading_stopping_and_the_watchdog(
    cli: Spawn, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    server = cli(*CLI, "--workers", "2", "--listen", TCP, "--handler",
                   "worker_handlers:PidHandler", "--mode", "threading")  # fmt: skip
    address = server.address()
    ready = notify.wait_for("READY", "1")
    # READY=1 once every worker serves, not before.
    output = server.output()
    assert len(re.findall(r"generation 0> ready", output)) == 2, (output, notify.messages)
    assert notify.messages[ready]["MAINPID"] == str(server.process.pid)
    assert notify.messages[ready]["STATUS"].startswith("2 of 2 workers ready")
    assert ask(address)["pid"] != server.process.pid
    # The workers never speak to systemd: every message is the supervisor's.
    watchdog = notify.wait_for("WATCHDOG", "1", timeout=WAIT)
    assert watchdog >= 0

    server.process.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", timeout=WAIT)
    assert "MONOTONIC_USEC" in notify.messages[reloading]
    ready_again = notify.wait_for("READY", "1", after=reloading)
    # Not before every new worker serves.
    assert len(re.findall(r"generation 1> ready", server.output())) == 2, server.output()
    assert "generation 1" in notify.messages[ready_again]["STATUS"]

    assert server.stop() == 0
    stopping = notify.wait_for("STOPPING", "1", timeout=WAIT)
    assert stopping > ready_again
    keys = notify.keys()
    assert keys.count("READY") == 2 and keys.count("STOPPING") == 1, notify.messages


def test_single_process_notifies_ready_then_stopping(
    cli: Spawn, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    server = cli(*CLI, "--listen", TCP, "--handler", "worker_handlers:PidHandler")
    address = server.address()
    ready = notify.wait_for("READY", "1")
    assert notify.messages[ready]["MAINPID"] == str(server.process.pid)
    assert "0 request(s) in flight" in notify.messages[ready]["STATUS"]
    # STATUS= follows the live count: one request held open.
    busy = notify.messages[ready]["STATUS"].replace("0 request(s)", "1 request(s)")
    with socket.create_connection(address, timeout=WAIT) as client:
        client.sendall(b"sleep 3\n")
        notify.wait_for("STATUS", busy, timeout=WAIT)
        recv_line(client)
    notify.wait_for("WATCHDOG", "1", timeout=WAIT)
    assert server.stop() == 0
    notify.wait_for("STOPPING", "1", timeout=WAIT)


def test_twistd_notifies_ready_and_stopping(cli: Spawn, notify: NotifySocket) -> None:
    server = cli(*TWISTD, "-n", "socketserver", "--listen", TCP, "--handler",
                   "worker_handlers:PidHandler")  # fmt: skip
    address = server.address()
    ready = notify.wait_for("READY", "1")
    assert notify.messages[ready]["MAINPID"] == str(server.process.pid)
    assert ask(address)["pid"] == server.process.pid
    # twistd (Twisted 20.3 and later) ends by the signal that stopped it.
    assert server.stop() in (0, -signal.SIGTERM)
    notify.wait_for("STOPPING", "1", timeout=WAIT)


def test_watchdog_is_withheld_while_no_worker_serves(
    cli: Spawn, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    crash = tmp_path / "crash"
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WORKER_TEST_CRASH_FILE", str(crash))
    server = cli(*CLI, "--workers", "1", "--listen", TCP, "--handler",
                   "worker_handlers:PidHandler")  # fmt: skip
    server.address()
    (pid,) = wait_for_workers(server, 1)
    notify.wait_for("READY", "1")
    notify.wait_for("WATCHDOG", "1", timeout=WAIT)
    crash.touch()  # its replacements die at start, again and again
    os.kill(pid, signal.SIGKILL)
    server.wait_for(re.compile(r"not sending WATCHDOG=1 to systemd: no worker is ready"),
                    timeout=WAIT)  # fmt: skip
    # Five watchdog periods without WATCHDOG=1: the status line still comes.
    before = notify.count()
    status = notify.wait_for("STATUS", timeout=WAIT, after=before - 1)
    with pytest.raises(AssertionError):
        notify.wait_for("WATCHDOG", timeout=1.0, after=status)
    crash.unlink()
    server.wait_for(re.compile(r"healthy again: sending WATCHDOG=1"), timeout=START)
    assert server.stop() == 0


def test_an_unwritable_notify_socket_is_logged_once_and_serving_goes_on(
    cli: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    server = cli(*CLI, "--workers", "1", "--listen", TCP, "--handler",
                   "worker_handlers:PidHandler")  # fmt: skip
    address = server.address()
    wait_for_workers(server, 1)
    server.wait_for(re.compile(r"cannot notify systemd on NOTIFY_SOCKET"), timeout=WAIT)
    # Pinged every 0.1 s from the start: many sends have failed by now.
    assert ask(address)["pid"] != server.process.pid
    assert server.stop() == 0
    assert server.output().count("cannot notify systemd") == 1, server.output()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="Debian's systemd package (.ci/run installs it)")  # fmt: skip
def test_socket_activation_by_systemd_socket_activate(
    cli: Spawn, notify: NotifySocket
) -> None:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        port = probe.getsockname()[1]
    server = cli(
        "systemd-socket-activate", "-l", f"{LOCALHOST}:{port}", "--fdname=http",
        "-E", f"NOTIFY_SOCKET={notify.name}",
        "-E", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}{os.pathsep}{REPO / 'tests'}",
        *CLI, "--workers", "2", "--listen", "systemd:domain=INET:name=http",
        "--handler", "worker_handlers:PidHandler",
    )  # fmt: skip
    # systemd-socket-activate listens, and starts the service on the first
    # connection: that connection waits in the kernel until a worker takes it.
    deadline = time.monotonic() + WAIT
    while True:
        try:
            client = socket.create_connection((LOCALHOST, port), timeout=START)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.05)
    with client:
        client.sendall(b"hi\n")
        first = recv_line(client)
    assert b'"pid"' in first
    ready = notify.wait_for("READY", "1")
    assert notify.messages[ready]["MAINPID"] == str(server.process.pid)
    assert ask((LOCALHOST, port))["pid"] != server.process.pid
    assert server.stop() == 0
    notify.wait_for("STOPPING", "1", timeout=WAIT)


def _units_in_docs() -> dict[str, str]:
    """The unit files docs/operations.md shows, by the name in their first line."""
    units = {}
    for block in re.findall(r"```ini\n(.*?)```", DOCS.read_text(), re.DOTALL):
        first, _, body = block.partition("\n")
        match = re.match(r"# /etc/systemd/system/(\S+)", first)
        if match:
            units[match.group(1)] = body
    return units


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="Debian's systemd package (.ci/run installs it)")  # fmt: skip
def test_the_unit_files_in_the_docs_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = _units_in_docs()
    assert {"myapp.socket", "myapp.service"} <= set(units), units
    for name, body in units.items():
        # verify insists that ExecStart's program exists: this interpreter stands in.
        body = body.replace("/srv/myapp/venv/bin/python", sys.executable)
        (tmp_path / name).write_text(body)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Warnings (an unknown key, a bad value) go to stderr with status 0: none allowed.
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "Type=notify" in units["myapp.service"]
    assert "WatchdogSec=" in units["myapp.service"]
