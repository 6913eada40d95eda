"""Workers behind real load balancers: HAProxy and nginx's stream proxy, PROXY protocol on.

Ours only (the stdlib knows nothing of load balancers).  Two instances, each
``python -m txsocketserver --workers 2 --listen haproxy:tcp:0...``, behind a
real HAProxy (PROXY v1 and v2, HTTP health checks sent with the PROXY
header) or a real nginx (``stream`` module, ``proxy_protocol on``), as in
``docs/operations.md``.  The balancers come from Debian (``.ci/run`` installs
them); a test is skipped only when its binary is missing.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import LOCALHOST, WAIT, wait_until
from test_twistd_cli import CLI, ServerProcess, Spawn, spawn  # noqa: F401
from test_workers import wait_for_workers

HTTP_HANDLER = "worker_handlers:PidHTTPHandler"
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    """test_twistd_cli's process starter (its finalizer kills what it started)."""
    return spawn


def start_instance(cli: Spawn) -> tuple[ServerProcess, tuple[str, int]]:
    server = cli(
        *CLI, "--workers", "2", "--listen", f"haproxy:tcp:0:interface={LOCALHOST}",
        "--handler", HTTP_HANDLER, "--mode", "threading", "--drain-timeout", "5",
    )  # fmt: skip
    address = server.address()
    wait_for_workers(server, 2)
    return server, address


def get(address: tuple[str, int], path: str = "/") -> tuple[dict[str, object], int]:
    """GET *path* through the balancer: the handler's JSON and our own source port."""
    connection = http.client.HTTPConnection(*address, timeout=WAIT)
    try:
        connection.connect()
        assert connection.sock is not None
        own_port = connection.sock.getsockname()[1]
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body), own_port
    finally:
        connection.close()


@dataclass
class Load:
    """A client sending requests through the balancer back to back, until stopped."""

    address: tuple[str, int]
    replies: list[dict[str, object]] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.replies.append(get(self.address)[0])
            except (OSError, AssertionError, ValueError, http.client.HTTPException) as exc:
                self.failures.append(exc)

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(2 * WAIT)
        assert not self._thread.is_alive()

    def wait_for_replies(self, count: int) -> None:
        target = len(self.replies) + count
        assert wait_until(lambda: len(self.replies) >= target, 3 * WAIT), self.failures


class Balancer:
    """A load balancer process; its output goes to a file read on failure."""

    def __init__(self, argv: list[str], workdir: Path, pass_fds: tuple[int, ...] = ()) -> None:
        self.log = workdir / "balancer.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def balancers() -> Iterator[list[Balancer]]:
    started: list[Balancer] = []
    yield started
    for balancer in started:
        balancer.stop()


def wait_for_both(front: tuple[str, int], a: ServerProcess, b: ServerProcess) -> None:
    """Request until both instances answered (the balancer's checks see them up)."""
    a_pids, b_pids = _pids_of(a), _pids_of(b)
    seen: set[object] = set()

    def both() -> bool:
        try:
            seen.add(get(front)[0]["pid"])
        except (OSError, AssertionError, http.client.HTTPException):
            return False
        return bool(seen & a_pids) and bool(seen & b_pids)

    assert wait_until(both, 4 * WAIT, interval=0.05), (seen, a.output(), b.output())


def _pids_of(server: ServerProcess) -> set[object]:
    return set(wait_for_workers(server, 2))


def stop_one_instance_under_load(
    front: tuple[str, int], stopped: ServerProcess, kept: ServerProcess
) -> tuple[list[BaseException], list[BaseException]]:
    """SIGTERM one instance while a client keeps sending requests through *front*.

    Returns the client's failures while the instance was stopping, and after it
    had exited; checks that every reply after that came from the other instance.
    """
    kept_pids = _pids_of(kept)
    with Load(front) as load:
        load.wait_for_replies(10)
        stopped.process.send_signal(signal.SIGTERM)
        assert stopped.finish() == 0
        before, failed_before = len(load.replies), len(load.failures)
        load.wait_for_replies(20)
    assert {reply["pid"] for reply in load.replies[before:]} <= kept_pids
    return load.failures[:failed_before], load.failures[failed_before:]


needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="no haproxy")


def start_haproxy(
    balancers: list[Balancer],
    tmp_path: Path,
    send_proxy: str,
    *backends: tuple[str, int],
    checks: str = "option httpchk GET /health",
    stats: str = "",
) -> tuple[str, int]:
    """HAProxy in front of *backends*, HTTP health checks on; its front address."""
    with socket.socket() as front_socket:
        front_socket.bind((LOCALHOST, 0))
        servers = "\n".join(
            f"    server s{index} {host}:{port} {send_proxy} check check-send-proxy "
            "inter 50ms fall 1 rise 1"
            for index, (host, port) in enumerate(backends)
        )
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                fd=front_socket.fileno(),
                servers=servers,
                checks=checks,
                stats=f"stats socket {stats}" if stats else "",
            )
        )
        # HAProxy listens on the socket it inherits (bind fd@N): no port race.
        balancer = Balancer(
            ["haproxy", "-db", "-f", str(config)], tmp_path, pass_fds=(front_socket.fileno(),)
        )
        balancers.append(balancer)
        return front_socket.getsockname()


@needs_haproxy
@pytest.mark.parametrize(
    "send_proxy",
    [
        "send-proxy",
        # send-proxy-v2 sends HAProxy's HTTP health checks as LOCAL, which
        # must be served (with the connection's own addresses) to pass.
        "send-proxy-v2",
    ],
)
def test_haproxy_in_front_of_two_instances(
    cli: Spawn, balancers: list[Balancer], tmp_path: Path, send_proxy: str
) -> None:
    a, a_address = start_instance(cli)
    b, b_address = start_instance(cli)
    front = start_haproxy(balancers, tmp_path, send_proxy, a_address, b_address)
    wait_for_both(front, a, b)
    for _ in range(10):
        reply, own_port = get(front)
        assert reply["client"] == [LOCALHOST, own_port]
    # HAProxy retries what the stopping instance refused or reset (retry-on).
    assert stop_one_instance_under_load(front, a, b) == ([], [])
    assert b.stop() == 0
    # HAProxy resets an HTTP check's connection once it has the status line,
    # so a handler still writing fails now and then: one info line, no traceback.
    for instance in (a, b):
        assert "Traceback" not in instance.output(), instance.output()


@needs_haproxy
def test_haproxy_tcp_health_checks_leave_no_traceback(
    cli: Spawn, balancers: list[Balancer], tmp_path: Path
) -> None:
    a, a_address = start_instance(cli)
    stats = tmp_path / "haproxy-stats.sock"
    front = start_haproxy(
        balancers, tmp_path, "send-proxy-v2", a_address, checks="", stats=str(stats)
    )
    assert wait_until(lambda: _answers(front), 4 * WAIT), "HAProxy does not answer"
    # A check every 50 ms while these requests run: a few dozen checks.
    for _ in range(40):
        get(front)
    assert "L4OK" in haproxy_stats(stats), "HAProxy ran no TCP check"
    assert a.stop() == 0
    assert "Traceback" not in a.output()


def _answers(front: tuple[str, int]) -> bool:
    try:
        get(front)
    except (OSError, AssertionError, http.client.HTTPException):
        return False
    return True


def haproxy_stats(path: Path) -> str:
    """``show stat`` on HAProxy's runtime API (CSV; check_status says L4OK...)."""
    with socket.socket(socket.AF_UNIX) as api:
        api.settimeout(WAIT)
        api.connect(str(path))
        api.sendall(b"show stat\n")
        chunks = []
        while chunk := api.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


HAPROXY_CONFIG = """\
global
    maxconn 256
    {stats}

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    # An instance that stops refuses connections: retry them on the other.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend front
    bind fd@{fd}
    default_backend instances

backend instances
    balance roundrobin
    {checks}
{servers}
"""


@pytest.mark.skipif(
    shutil.which("nginx") is None or not NGINX_STREAM_MODULE.exists(),
    reason="nginx with the stream module (Debian: libnginx-mod-stream) is not installed",
)
def test_nginx_stream_proxy_protocol_in_front_of_two_instances(
    cli: Spawn, balancers: list[Balancer], tmp_path: Path
) -> None:
    a, a_address = start_instance(cli)
    b, b_address = start_instance(cli)
    # nginx binds its own port: find a free one (bound and released here).
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        front = probe.getsockname()
    config = tmp_path / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(
            module=NGINX_STREAM_MODULE, workdir=tmp_path, front=f"{front[0]}:{front[1]}",
            a=f"{a_address[0]}:{a_address[1]}", b=f"{b_address[0]}:{b_address[1]}",
        )
    )  # fmt: skip
    balancer = Balancer(
        ["nginx", "-p", str(tmp_path), "-e", "stderr", "-c", str(config)], tmp_path
    )
    balancers.append(balancer)
    wait_for_both(front, a, b)
    for _ in range(10):
        reply, own_port = get(front)
        assert reply["client"] == [LOCALHOST, own_port]
    while_stopping, after = stop_one_instance_under_load(front, a, b)
    # nginx's stream proxy retries a refused connection on the other instance
    # (proxy_next_upstream), but not one it had already sent bytes on: the
    # request on a connection accepted at the very moment the instance
    # stopped listening, if any, is lost (take an instance out of the
    # upstream before stopping it: docs/operations.md).
    assert after == []
    assert len(while_stopping) <= 1, while_stopping
    assert not any(isinstance(f, ConnectionRefusedError) for f in while_stopping)
    balancer.stop()
    assert b.stop() == 0
    for server in (a, b):
        assert "Traceback" not in server.output(), server.output()


NGINX_CONFIG = """\
load_module {module};
daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 128; }}

stream {{
    upstream instances {{
        server {a} max_fails=1 fail_timeout=10s;
        server {b} max_fails=1 fail_timeout=10s;
    }}
    server {{
        listen {front};
        proxy_pass instances;
        proxy_protocol on;
        proxy_connect_timeout 2s;
        # A refused connection is tried on the next instance.
        proxy_next_upstream on;
    }}
}}
"""
