"""Metrics, liveness and readiness, the access log, and the stop in phases, as operators see them.

Every test runs real processes (``python -m txsocketserver``, ``twistd``,
``--workers``) and real clients; ``/metrics`` is read over HTTP and parsed
with ``prometheus_client``'s own parser.  The real Prometheus, ``promtool``
and HAProxy tests are in ``test_observability_interop.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import txsocketserver
from support import LOCALHOST, WAIT, connect, recv_all, recv_line, serve_in_thread, wait_until
from test_twistd_cli import CLI, TWISTD, ServerProcess, Spawn, spawn  # noqa: F401
from test_workers import wait_for_workers

HANDLER = "observability_handlers:LineHandler"
METRICS_AT = re.compile(r"/readyz on \S+ at (\S+):(\d+)")
TCP = f"tcp:0:interface={LOCALHOST}"


@pytest.fixture
def cli(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    return spawn


def metrics_address(server: ServerProcess) -> tuple[str, int]:
    match = server.wait_for(METRICS_AT)
    return match.group(1), int(match.group(2))


def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    url = f"http://{address[0]}:{address[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, labels): value}`` of one scrape of ``/metrics``."""
    status, body = http_get(address, "/metrics")
    assert status == 200, body
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def ask(address: tuple[str, int], *lines: bytes) -> list[bytes]:
    """One connection: send each line, read each reply."""
    with connect(address) as client:
        replies = []
        for line in lines:
            client.sendall(line)
            replies.append(recv_line(client))
        return replies


def start(cli: Spawn, *args: str) -> tuple[ServerProcess, tuple[str, int], tuple[str, int]]:
    server = cli(*CLI, "--listen", TCP, "--handler", HANDLER, "--metrics", TCP, *args)
    return server, server.address(), metrics_address(server)


def test_metrics_livez_readyz_and_404(cli: Spawn) -> None:
    server, address, metrics = start(cli, "--mode", "threading")
    for _ in range(3):
        assert ask(address, b"a\n", b"b\n") == [b"ok\n", b"ok\n"]
    with connect(address) as client:
        client.sendall(b"fail\n")
        assert client.recv(10) == b""
    assert http_get(metrics, "/livez")[0] == 200
    assert http_get(metrics, "/readyz")[0] == 200
    assert http_get(metrics, "/nope")[0] == 404
    label = {"server": TCP}
    assert wait_until(
        lambda: value(scrape(metrics), "txsocketserver_requests_total", **label) == 4
    )
    samples = scrape(metrics)
    # The endpoint's own requests (several by now) are not the server's.
    assert value(samples, "txsocketserver_connections_accepted_total", **label) == 4
    assert value(samples, "txsocketserver_requests_started_total", **label) == 4
    assert value(samples, "txsocketserver_requests_failed_total", **label) == 1
    assert value(samples, "txsocketserver_request_duration_seconds_count", **label) == 4
    assert value(samples, "txsocketserver_connections_active", **label) == 0
    assert ("txsocketserver_pool_threads", (("server", TCP), ("state", "busy"))) in samples
    assert value(samples, "process_cpu_seconds_total") > 0  # prometheus_client's collectors
    assert server.stop() == 0


def test_readyz_answers_503_from_the_moment_a_stop_begins(cli: Spawn) -> None:
    server, address, metrics = start(cli, "--mode", "threading", "--drain-delay", "30")
    assert http_get(metrics, "/readyz")[0] == 200
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: http_get(metrics, "/readyz")[0] == 503, WAIT)
    # The delay: still serving, and still live.
    assert ask(address, b"x\n") == [b"ok\n"]
    assert http_get(metrics, "/livez")[0] == 200
    # A second signal ends the delay and the process at once.
    assert server.stop(signal.SIGINT, timeout=WAIT) == 130


def test_a_client_hammering_through_the_drain_delay_loses_no_request(cli: Spawn) -> None:
    server, address, metrics = start(cli, "--mode", "threading", "--drain-delay", "4")
    replies: list[bytes] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def hammer() -> None:
        while not done.is_set():
            try:
                replies.extend(ask(address, b"x\n"))
            except OSError as exc:
                failures.append(exc)

    client = threading.Thread(target=hammer, daemon=True)
    client.start()
    try:
        assert wait_until(lambda: len(replies) >= 10, WAIT)
        server.process.send_signal(signal.SIGTERM)
        assert wait_until(lambda: http_get(metrics, "/readyz")[0] == 503, WAIT)
        at_stop = len(replies)
        # Hammer through most of the delay (its end, when the socket closes,
        # is what the load balancer's readiness check keeps clients from).
        stopped_early = done.wait(2.0)
        assert not stopped_early
    finally:
        done.set()
        client.join(WAIT)
    assert not client.is_alive()
    assert http_get(metrics, "/readyz")[0] == 503, "the delay ended early"
    assert failures == []
    assert set(replies) == {b"ok\n"}
    assert len(replies) > at_stop + 10, "little was served during the delay"
    assert server.finish() == 0


class _Echo(txsocketserver.DatagramRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.read())


def test_library_metrics_in_its_own_registry_and_served_on_unix(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from txsocketserver._twisted.reactor import call_in_reactor

    registry = CollectorRegistry()
    metrics = txsocketserver.Metrics(registry=registry)
    server = txsocketserver.UDPServer((LOCALHOST, 0), _Echo)
    metrics.observe(server, name="udp")
    with serve_in_thread(server), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(WAIT)
        for payload in (b"a", b"b", b"c"):
            client.sendto(payload, server.server_address)
            assert client.recv(10) == payload
        port = metrics.listen_blocking(f"unix:{tmp_path}/metrics.sock")
        try:
            with socket.socket(socket.AF_UNIX) as http:
                http.settimeout(WAIT)
                http.connect(f"{tmp_path}/metrics.sock")
                http.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
                assert recv_all(http).startswith(b"HTTP/1.0 200 ")
        finally:
            call_in_reactor(port.stopListening)
    text = generate_latest(registry).decode()
    assert 'txsocketserver_datagrams_received_total{server="udp"} 3.0' in text
    assert 'txsocketserver_requests_total{server="udp"} 3.0' in text
    # Its own registry: nothing else in it.
    assert "process_cpu_seconds_total" not in text
    server.server_close()
    assert not metrics.health.ready()  # closed: no longer listening


def test_workers_one_scrape_sums_every_worker_and_counters_never_go_back(cli: Spawn) -> None:
    server, address, metrics = start(cli, "--workers", "2", "--mode", "threading")
    pids = wait_for_workers(server, 2)
    served: set[int] = set()
    for _ in range(20):
        # Two connections at once: each worker gets some.
        with connect(address) as first, connect(address) as second:
            first.sendall(b"x\n")
            second.sendall(b"x\n")
            assert recv_line(first) == recv_line(second) == b"ok\n"
        served.add(0)
    label = {"server": TCP}

    def requests() -> float:
        return value(scrape(metrics), "txsocketserver_requests_total", **label)

    assert wait_until(lambda: requests() == 40, WAIT), scrape(metrics)
    samples = scrape(metrics)
    assert value(samples, "txsocketserver_workers") == 2
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    wait_for_workers(server, 2, timeout=30)
    assert requests() == 40  # the dead worker's counts are kept
    ask(address, b"x\n")
    assert wait_until(lambda: requests() == 41, WAIT)
    samples = scrape(metrics)
    assert value(samples, "txsocketserver_worker_restarts_total", cause="exited") == 1
    assert value(samples, "txsocketserver_worker_restarts_total", cause="reload") == 0
    server.process.send_signal(signal.SIGHUP)
    assert wait_until(
        lambda: (
            value(scrape(metrics), "txsocketserver_worker_restarts_total", cause="reload") == 2
        ),
        30,
    )
    assert wait_until(lambda: len(wait_for_workers(server, 2, generation=1)) == 2, 30)
    assert requests() == 41  # across the reload too
    assert server.stop() == 0


def test_access_log_text_and_json_and_no_forged_lines(cli: Spawn, tmp_path: Path) -> None:
    for log_format in ("text", "json"):
        access = tmp_path / f"access-{log_format}.log"
        server = cli(
            *CLI, "--listen", TCP, "--handler", HANDLER, "--access-log", str(access),
            "--log-format", log_format,
        )  # fmt: skip
        address = server.address()
        ask(address, b"a\n")
        # Its record is written once its pool thread has closed the
        # connection, after the client has its reply: wait, so that the
        # records come in the order asserted below.
        assert wait_until(
            lambda: access.exists() and len(access.read_text().splitlines()) == 1,  # noqa: B023
            WAIT,
        )
        with connect(address) as client:
            # The handler's error message (logged) is the client's line.
            client.sendall(b"fail\rFORGED line\x1b[2K\n")
            assert client.recv(10) == b""
        assert wait_until(lambda: len(access.read_text().splitlines()) == 2, WAIT)  # noqa: B023
        assert server.stop() == 0
        records = access.read_text().splitlines()
        server_log = server.output().splitlines()
        if log_format == "json":
            parsed = [json.loads(line) for line in records]
            assert [record["outcome"] for record in parsed] == ["ok", "error"]
            assert {record["type"] for record in parsed} == {"access"}
            assert parsed[0]["pid"] == server.process.pid
            assert parsed[0]["server"] == TCP and parsed[0]["peer"].startswith(LOCALHOST)
            assert parsed[0]["duration"] >= 0
            # The server's own log: JSON too, one object per line, nothing forged.
            events = [json.loads(line) for line in server_log if line.startswith("{")]
            assert any("FORGED" in event.get("traceback", "") for event in events)
            assert all(line.startswith("{") for line in server_log[1:]), server_log
        else:
            assert " ok " in records[0] and " error " in records[1]
            assert all(re.match(r"\d{4}-\d\d-\d\dT", line) for line in records)
            assert not any(line.startswith("FORGED") for line in server_log)
            assert any("\\rFORGED line\\x1b[2K" in line for line in server_log), server_log


def test_twistd_serves_metrics_and_access_log(cli: Spawn, tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    server = cli(
        *TWISTD, "-n", "socketserver", "--listen", TCP, "--handler", HANDLER,
        "--metrics", TCP, "--access-log", str(access), "--drain-delay", "0.5",
    )  # fmt: skip
    address, metrics = server.address(), metrics_address(server)
    ask(address, b"a\n")
    assert wait_until(
        lambda: value(scrape(metrics), "txsocketserver_requests_total", server=TCP) == 1, WAIT
    )
    assert wait_until(lambda: access.read_text().count("\n") == 1, WAIT)
    assert " ok " in access.read_text()
    # twistd's own log has the access record too.
    assert wait_until(lambda: "txsocketserver.access" in server.output(), WAIT)
    server.process.send_signal(signal.SIGTERM)
    assert wait_until(lambda: http_get(metrics, "/readyz")[0] == 503, WAIT)
    assert server.finish() in (0, -signal.SIGTERM)  # twistd 25+ exits by the signal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--log-format", "xml"], "--log-format 'xml': choose one of text, json"),
        (["--access-log", "/nonexistent/dir/access.log"],
         "--access-log '/nonexistent/dir/access.log': cannot write: No such file or directory"),
        (["--metrics", "nonsense:1"], "--metrics 'nonsense:1': "),
        (["--drain-delay", "-1"], "--drain-delay must not be negative"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(cli: Spawn, args: list[str], message: str) -> None:
    process = cli(*CLI, "--listen", TCP, "--handler", HANDLER, *args)
    assert process.finish() == 2
    assert message in process.output()
    assert "Traceback" not in process.output()


def test_metrics_endpoint_that_cannot_listen_exits_2(cli: Spawn) -> None:
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ([], ["--workers", "2"]):
            process = cli(
                *CLI, "--listen", TCP, "--handler", HANDLER, *workers,
                "--metrics", f"tcp:{port}:interface={LOCALHOST}",
            )  # fmt: skip
            assert process.finish() == 2
            assert f"--metrics 'tcp:{port}:interface={LOCALHOST}': cannot listen" in (
                process.output()
            )
            assert "Traceback" not in process.output()
            assert "started <worker" not in process.output()


def test_metrics_without_prometheus_client_names_the_extra(cli: Spawn, tmp_path: Path) -> None:
    # A prometheus_client that fails to import, ahead of the real one on the path.
    (tmp_path / "prometheus_client").mkdir()
    (tmp_path / "prometheus_client" / "__init__.py").write_text("raise ImportError('absent')\n")
    process = cli(
        "env", f"PYTHONPATH={tmp_path}:{Path(__file__).parent}", *CLI,
        "--listen", TCP, "--handler", HANDLER, "--metrics", TCP,
    )  # fmt: skip
    assert process.finish() == 2
    assert "pip install 'txsocketserver[metrics]'" in process.output()
    assert "Traceback" not in process.output()


class _Refusing(txsocketserver.ThreadingTCPServer):
    def verify_request(self, request: object, client_address: object) -> bool:
        return False


class _AsyncEcho(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            self.wfile.write(line)


def test_library_refusals_bytes_and_access_records() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from twisted.logger import globalLogPublisher

    from txsocketserver._observability.access_log import AccessLog

    registry = CollectorRegistry()
    metrics = txsocketserver.Metrics(registry=registry)
    refusing = _Refusing((LOCALHOST, 0), txsocketserver.StreamRequestHandler)
    echo = txsocketserver.TCPServer((LOCALHOST, 0), _AsyncEcho)
    metrics.observe(refusing, name="refusing")
    metrics.observe(echo, name="echo")
    refusing.add_observer(AccessLog("refusing"))
    echo.add_observer(AccessLog("echo"))
    access: list[dict[str, object]] = []

    def observe(event: dict[str, object]) -> None:
        if "access" in event:
            access.append(event["access"])  # type: ignore[arg-type]

    globalLogPublisher.addObserver(observe)
    with serve_in_thread(refusing), serve_in_thread(echo):
        with connect(refusing.server_address) as client:
            assert client.recv(10) == b""
        assert ask(echo.server_address, b"hello\n", b"again\n") == [b"hello\n", b"again\n"]
        assert wait_until(
            lambda: 'txsocketserver_requests_total{server="echo"} 1.0'
            in generate_latest(registry).decode()
        )
    text = generate_latest(registry).decode()
    refused = 'txsocketserver_connections_refused_total{reason="verify_request",server="refusing"}'
    assert f"{refused} 1.0" in text
    assert 'txsocketserver_received_bytes_total{server="echo"} 12.0' in text
    assert 'txsocketserver_sent_bytes_total{server="echo"} 12.0' in text
    globalLogPublisher.removeObserver(observe)
    outcomes = {record["server"]: record for record in access}  # type: ignore[index]
    assert outcomes["refusing"]["outcome"] == "refused:verify_request"  # type: ignore[index]
    assert outcomes["echo"]["outcome"] == "ok"  # type: ignore[index]
    assert outcomes["echo"]["bytes_in"] == outcomes["echo"]["bytes_out"] == 12  # type: ignore[index]
    refusing.server_close()
    echo.server_close()
