"""Metrics and readiness against the real things: Prometheus, promtool, HAProxy.

Debian's ``prometheus`` (with ``promtool``) and ``haproxy`` packages, which
``.ci/run`` installs; a test is skipped only when its binary is missing.
Prometheus runs on loopback with a scrape config the test writes; HAProxy
health-checks each instance's ``/readyz``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from support import LOCALHOST, WAIT, connect, recv_line, wait_until
from test_load_balancers import Balancer, Load, balancers, get  # noqa: F401
from test_observability import HANDLER, TCP, http_get, metrics_address
from test_twistd_cli import CLI, ServerProcess, Spawn, spawn  # noqa: F401
from test_workers import wait_for_workers

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="no prometheus (Debian's prometheus package)",
)
needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="no haproxy")


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    return spawn


def free_port() -> int:
    # Prometheus takes no inherited socket: a port the kernel just gave out
    # (and nobody else on this loopback asks for at random).
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def ask(address: tuple[str, int]) -> None:
    with connect(address) as client:
        client.sendall(b"x\n")
        assert recv_line(client) == b"ok\n"


class Prometheus:
    """A real Prometheus scraping *targets* every 200 ms, on loopback."""

    def __init__(self, workdir: Path, *targets: tuple[str, int]) -> None:
        config = workdir / "prometheus.yml"
        listed = ", ".join(f"'{host}:{port}'" for host, port in targets)
        config.write_text(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n"
            "scrape_configs:\n  - job_name: txsocketserver\n"
            f"    static_configs:\n      - targets: [{listed}]\n"
        )
        self.address = (LOCALHOST, free_port())
        self.balancer = Balancer(
            [
                "prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={self.address[0]}:{self.address[1]}",
            ],
            workdir,
        )  # fmt: skip
        assert wait_until(self._ready, 3 * WAIT), self.balancer.output()

    def _ready(self) -> bool:
        try:
            return http_get(self.address, "/-/ready")[0] == 200
        except OSError:
            return False

    def query(self, expression: str) -> list[dict[str, object]]:
        """The instant vector of *expression*, through the HTTP API."""
        status, body = http_get(
            self.address, "/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        )
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]  # type: ignore[no-any-return]

    def value(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None  # type: ignore[index]

    def stop(self) -> None:
        self.balancer.stop()


@needs_prometheus
def test_prometheus_reads_the_sum_over_workers_across_a_killed_worker(
    cli: Spawn, tmp_path: Path
) -> None:
    server = cli(
        *CLI, "--workers", "2", "--listen", TCP, "--handler", HANDLER, "--metrics", TCP,
        "--mode", "threading",
    )  # fmt: skip
    address, metrics = server.address(), metrics_address(server)
    pids = wait_for_workers(server, 2)
    prometheus = Prometheus(tmp_path, metrics)
    try:
        for _ in range(30):
            ask(address)
        total = "sum(txsocketserver_requests_total)"
        assert wait_until(lambda: prometheus.value(total) == 30, 3 * WAIT), prometheus.query(
            "txsocketserver_requests_total"
        )
        os.kill(min(pids), signal.SIGKILL)
        wait_for_workers(server, 2, timeout=30)
        for _ in range(5):
            ask(address)
        assert wait_until(lambda: prometheus.value(total) == 35, 3 * WAIT), prometheus.query(
            "txsocketserver_requests_total"
        )
        exited = 'txsocketserver_worker_restarts_total{cause="exited"}'
        assert wait_until(lambda: prometheus.value(exited) == 1, 3 * WAIT)
        assert prometheus.value("txsocketserver_workers") == 2
        # The counter never went backwards while the worker died and was replaced.
        assert prometheus.value("resets(txsocketserver_requests_total[5m])") == 0
        assert prometheus.value('up{job="txsocketserver"}') == 1
    finally:
        prometheus.stop()
    assert server.stop() == 0


@needs_prometheus
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_promtool_accepts_our_exposition(cli: Spawn, workers: list[str]) -> None:
    server = cli(
        *CLI, *workers, "--listen", TCP, "--handler", HANDLER, "--metrics", TCP,
        "--mode", "threading",
    )  # fmt: skip
    address, metrics = server.address(), metrics_address(server)
    if workers:
        wait_for_workers(server, 2)
    ask(address)
    status, body = http_get(metrics, "/metrics")
    assert status == 200
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True,
        timeout=WAIT,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""  # no lint remark either
    assert server.stop() == 0


HAPROXY_CONFIG = """\
global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    # No retry, no redispatch: only the readiness check keeps clients away
    # from the stopping instance.
    retries 0

frontend front
    bind fd@{fd}
    default_backend instances

backend instances
    balance roundrobin
    option httpchk GET /readyz
{servers}
"""


@needs_haproxy
def test_haproxy_checking_readyz_takes_a_stopping_instance_out_of_rotation(
    cli: Spawn,
    balancers: list[Balancer],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    instances = []
    for _ in range(2):
        instance = cli(
            *CLI, "--listen", TCP, "--handler", "worker_handlers:PidHTTPHandler",
            "--mode", "threading", "--metrics", TCP, "--drain-delay", "2",
        )  # fmt: skip
        instances.append((instance, instance.address(), metrics_address(instance)))
    with socket.socket() as front_socket:
        front_socket.bind((LOCALHOST, 0))
        servers = "\n".join(
            f"    server s{index} {host}:{port} check port {m_port} inter 100ms fall 1 rise 1"
            for index, (_, (host, port), (_, m_port)) in enumerate(instances)
        )
        config = tmp_path / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(fd=front_socket.fileno(), servers=servers))
        balancers.append(
            Balancer(
                ["haproxy", "-db", "-f", str(config)], tmp_path, pass_fds=(front_socket.fileno(),)
            )
        )
        front = front_socket.getsockname()
    (stopped, _, _), (kept, _, _) = instances
    pids = {stopped.process.pid, kept.process.pid}
    assert wait_until(lambda: _pid_through(front) == stopped.process.pid, 3 * WAIT)
    assert wait_until(lambda: _pid_through(front) == kept.process.pid, 3 * WAIT)
    with Load(front) as load:
        load.wait_for_replies(20)
        stopped.process.send_signal(signal.SIGTERM)
        assert stopped.finish() == 0
        after = len(load.replies)
        load.wait_for_replies(20)
    assert load.failures == [], (load.failures, balancers[0].output())
    assert {reply["pid"] for reply in load.replies} == pids
    assert {reply["pid"] for reply in load.replies[after:]} == {kept.process.pid}
    assert "is DOWN" in balancers[0].output() or "DOWN" in balancers[0].output()
    assert kept.stop() == 0


def _pid_through(front: tuple[str, int]) -> object:
    try:
        return get(front)[0]["pid"]
    except (OSError, AssertionError):
        return None
