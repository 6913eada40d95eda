"""The ``twistd socketserver`` plugin and ``python -m txsocketserver``, as operators run them.

Every test starts real processes and talks to them with real clients; every
process is killed in a finalizer, every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.internet.endpoints import quoteStringArgument

from support import (
    LOCALHOST,
    WAIT,
    SelfSignedCert,
    connect,
    recv_all,
    recv_line,
    systemd_activation,
    wait_until,
)
from twisted_world_handlers import firehose_digest, receive_firehose_digest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: Starting a process that imports Twisted takes a while on a loaded machine.
START_TIMEOUT = 20.0
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
TWIST = [sys.executable, "-m", "twisted"]
CLI = [sys.executable, "-m", "txsocketserver"]
LISTENING = re.compile(r" at (\S+):(\d+) \(")


class ServerProcess:
    """A server subprocess whose output (stdout and stderr) goes to a temp file."""

    def __init__(
        self,
        argv: list[str],
        cwd: Path = REPO,
        pass_fds: tuple[int, ...] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(REPO)])
        env["PYTHONUNBUFFERED"] = "1"
        self.output_file = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.output_file,
            stderr=subprocess.STDOUT,
            pass_fds=pass_fds,
            preexec_fn=preexec_fn,
        )

    def output(self) -> str:
        self.output_file.seek(0)
        return self.output_file.read().decode(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout: float = START_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = pattern.search(self.output())
            if match:
                return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern.pattern!r} in the output:\n{self.output()}")

    def address(self) -> tuple[str, int]:
        match = self.wait_for(LISTENING)
        return match.group(1), int(match.group(2))

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 2 * WAIT) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running {timeout}s after {signum}:\n{self.output()}"
            ) from None

    def finish(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.output_file.close()

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1)) * 1024


Spawn = Callable[..., ServerProcess]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    processes: list[ServerProcess] = []

    def start(*argv: str, **kwargs: object) -> ServerProcess:
        process = ServerProcess(list(argv), **kwargs)  # type: ignore[arg-type]
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def tls_endpoint(cert: SelfSignedCert) -> str:
    return (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}"
    )


TCP = f"tcp:0:interface={LOCALHOST}"


def test_twistd_lists_and_explains_the_plugin(spawn: Spawn) -> None:
    listing = spawn(*TWISTD, "--help")
    assert listing.finish() == 0
    assert re.search(r"^\s+socketserver\s", listing.output(), re.MULTILINE), listing.output()
    usage = spawn(*TWISTD, "socketserver", "--help")
    assert usage.finish() == 0
    for option in ("--listen", "--handler", "--mode", "--max-threads", "--server"):
        assert option in usage.output()
    for word in ("haproxy:", "systemd:", "ssl:", "sync", "threading", "forking"):
        assert word in usage.output()


@pytest.mark.parametrize(
    ("front_end", "program"),
    [
        (CLI, "python -m txsocketserver"),
        (TWISTD + ["socketserver"], "twistd [options] socketserver"),
    ],
)
def test_version_is_ours_and_usage_names_the_program(
    spawn: Spawn, front_end: list[str], program: str
) -> None:
    import twisted
    import txsocketserver

    version = spawn(*front_end, "--version")
    assert version.finish() == 0
    first_line = version.output().splitlines()[0]
    assert first_line.startswith(f"txsocketserver {txsocketserver.__version__} "), first_line
    assert f"Twisted {twisted.version.public()}" in first_line
    assert "Twisted version:" not in version.output()
    usage = spawn(*front_end, "--help")
    assert usage.finish() == 0
    assert usage.output().startswith(f"Usage: {program} --listen ENDPOINT "), usage.output()


def test_twistd_serves_a_handler_and_stops_on_sigterm(spawn: Spawn) -> None:
    server = spawn(
        *TWISTD, "-n", "--pidfile=", "--logfile=-", "socketserver",
        "--listen", TCP, "--handler", "examples.echo_server:EchoHandler",
    )  # fmt: skip
    address = server.address()
    for _ in range(2):
        with connect(address) as client:
            client.sendall(b"hello twistd\n")
            assert recv_line(client) == b"hello twistd\n"
    # Twisted exits by re-raising the signal that stopped it, after a clean stop.
    assert server.stop() in (0, -signal.SIGTERM)
    assert "stopped serving at" in server.output()
    assert "Traceback" not in server.output()


def test_twist_serves_stdlib_http_over_verified_tls(
    spawn: Spawn, tls_cert: SelfSignedCert, tmp_path: Path
) -> None:
    (tmp_path / "hello.txt").write_bytes(b"served over TLS\n")
    server = spawn(
        *TWIST, "socketserver", "--listen", tls_endpoint(tls_cert),
        "--handler", "http.server:SimpleHTTPRequestHandler", "--mode", "sync",
        cwd=tmp_path,
    )  # fmt: skip
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with (
        connect(server.address()) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as client,
    ):
        client.sendall(b"GET /hello.txt HTTP/1.0\r\nHost: localhost\r\n\r\n")
        reply = recv_all(client)
    assert reply.startswith(b"HTTP/1.0 200"), reply[:200]
    assert reply.endswith(b"\r\n\r\nserved over TLS\n")
    assert server.stop() in (0, -signal.SIGTERM)


@pytest.mark.parametrize("mode", ["sync", "threading", "forking"])
def test_cli_drains_request_in_flight_on_sigterm(spawn: Spawn, mode: str) -> None:
    extra = ["--max-threads", "2"] if mode == "threading" else []
    server = spawn(
        *CLI, "--listen", TCP, "--handler", "twisted_world_handlers:SlowEchoHandler",
        "--mode", mode, *extra,
    )  # fmt: skip
    address = server.address()
    with connect(address) as client:
        client.sendall(b"in flight\n")
        time.sleep(0.1)  # the handler is sleeping now
        server.process.send_signal(signal.SIGTERM)
        assert recv_line(client) == b"in flight\n"
    assert server.finish() == 0
    assert "SIGTERM: stopping" in server.output()
    with pytest.raises(ConnectionRefusedError):
        connect(address).close()


@pytest.mark.parametrize(
    ("front_end", "args", "message"),
    [
        (CLI, ["--handler", "no_such_module:Handler"], "cannot import module 'no_such_module'"),
        (CLI, ["--handler", "twisted_world_handlers:Nope"], "has no attribute 'Nope'"),
        (CLI, ["--handler", "examples.echo_server"], "expected package.module:Name"),
        (CLI, ["--listen", "bogus:1", "--handler", "http.server:BaseHTTPRequestHandler"],
         "Unknown endpoint type: 'bogus'"),
        (CLI, ["--handler", "http.server:BaseHTTPRequestHandler", "--server",
               "http.server:HTTPServer"], "not a txsocketserver server"),
        (TWISTD + ["-n", "--pidfile=", "socketserver"],
         ["--handler", "no_such_module:Handler"], "cannot import module 'no_such_module'"),
    ],
)  # fmt: skip
def test_clear_errors(spawn: Spawn, front_end: list[str], args: list[str], message: str) -> None:
    if "--listen" not in args:
        args = ["--listen", TCP, *args]
    process = spawn(*front_end, *args)
    assert process.finish() != 0
    assert message in process.output()
    assert "Traceback" not in process.output()


def test_systemd_socket_activation(spawn: Spawn) -> None:
    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        fd = listening.fileno()
        server = spawn(
            *systemd_activation(fd, "echo.socket"),
            "--listen", "systemd:domain=INET:index=0",
            "--handler", "twisted_world_handlers:AddressHandler",
            pass_fds=(fd,),
        )  # fmt: skip
        assert server.address() == listening.getsockname()
        with connect(listening.getsockname()) as client:
            assert recv_line(client).startswith(b'{"client": ["127.0.0.1", ')
        assert server.stop() == 0


def test_flow_control_over_tls_bounds_server_memory(
    spawn: Spawn, tls_cert: SelfSignedCert
) -> None:
    size = 100 * 1024 * 1024
    server = spawn(
        *CLI, "--listen", tls_endpoint(tls_cert),
        "--handler", "twisted_world_handlers:FirehoseHandler",
    )  # fmt: skip
    address = server.address()
    baseline = server.rss_bytes()
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.settimeout(WAIT)
        raw.connect(address)
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"%d\n" % size)
            # Not reading: the server must stop producing, not buffer 100 MB.
            rss = [server.rss_bytes()]
            for _ in range(8):
                time.sleep(0.1)
                rss.append(server.rss_bytes())
            assert max(rss) - baseline < 32 * 1024 * 1024, (baseline, rss)
            digest = receive_firehose_digest(client, size)
    assert digest == firehose_digest(size)
    assert wait_until(lambda: server.process.poll() is None)
    assert server.stop() == 0


PROXIED = f"haproxy:tcp:0:interface={LOCALHOST}"


def proxy_v1(source: str = "10.1.2.3", port: int = 5555) -> bytes:
    return f"PROXY TCP4 {source} 127.0.0.1 {port} 80\r\n".encode()


@pytest.mark.parametrize("listen", [TCP, PROXIED])
def test_cli_exit_is_bounded_by_the_drain_timeout(spawn: Spawn, listen: str) -> None:
    # Ours only: the stdlib has no command line; its non-daemon request
    # threads would hold exit for as long as the handler sleeps (30 s).
    server = spawn(
        *CLI, "--listen", listen, "--handler", "twisted_world_handlers:SleepyHandler",
        "--drain-timeout", "1",
    )  # fmt: skip
    with connect(server.address()) as client:
        if listen == PROXIED:
            client.sendall(proxy_v1())
        assert recv_line(client) == b"started\n"
        stopped_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.finish() == 0
        # The drain (1 s), the stragglers' grace (2 s), then out: never the
        # handler's 30 s.
        assert time.monotonic() - stopped_at < 1 + 2 + 2, server.output()
        assert recv_all(client) == b""
    assert "1 request(s) still running after 1.0s" in server.output()
    assert "Traceback" not in server.output()


def test_cli_second_signal_stops_at_once(spawn: Spawn) -> None:
    server = spawn(
        *CLI, "--listen", TCP, "--handler", "twisted_world_handlers:SleepyHandler",
        "--drain-timeout", "60",
    )  # fmt: skip
    with connect(server.address()) as client:
        assert recv_line(client) == b"started\n"
        server.process.send_signal(signal.SIGINT)
        server.wait_for(re.compile("SIGINT: stopping"))
        again_at = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.finish() == 130
        assert time.monotonic() - again_at < 2, server.output()
    assert "SIGINT again: stopping now" in server.output()
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("front_end", ["cli", "twistd"])
def test_refusals_access_lines_and_errors_are_logged_with_the_client(
    spawn: Spawn, front_end: str, tmp_path: Path
) -> None:
    (tmp_path / "index.html").write_bytes(b"hello\n")
    argv = [*CLI, "--log-level", "debug"] if front_end == "cli" else [
        *TWISTD, "-n", "--pidfile=", "--logfile=-", "socketserver"]  # fmt: skip
    server = spawn(
        *argv, "--listen", PROXIED, "--handler", "http.server:SimpleHTTPRequestHandler",
        cwd=tmp_path,
    )  # fmt: skip
    address = server.address()
    with connect(address) as client:
        client.sendall(proxy_v1() + b"GET / HTTP/1.0\r\n\r\n")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client).endswith(b"\r\n\r\nhello\n")
    with connect(address) as client:
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert recv_all(client) == b""
        refused = client.getsockname()[1]
    with connect(address) as client:
        client.sendall(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")  # PROXY v2 LOCAL
        client.shutdown(socket.SHUT_WR)  # a TCP health check: served, and nothing asked
        assert recv_all(client) == b""
    server.wait_for(re.compile(r"#debug\] PROXY LOCAL connection \(a health check\)"))
    output = server.output()
    assert re.search(r'\[txsocketserver\.handler#info\] 10\.1\.2\.3 "GET / HTTP/1\.0" 200', output)
    assert (
        f"[txsocketserver#warn] refused connection from ('127.0.0.1', {refused}): "
        "not a PROXY protocol header" in output
    )
    assert "stderr#error" not in output and "Traceback" not in output
    assert server.stop() in (0, -signal.SIGTERM)


def test_cli_handler_errors_go_to_the_log_as_errors(spawn: Spawn) -> None:
    server = spawn(*CLI, "--listen", PROXIED, "--handler", "twisted_world_handlers:FailingHandler")
    with connect(server.address()) as client:
        client.sendall(proxy_v1())
        assert recv_all(client) == b""
    server.wait_for(re.compile(r"ValueError: handler failure for the test"))
    assert (
        "[txsocketserver#error] Exception occurred during processing of request from "
        "('10.1.2.3', 5555)" in server.output()
    )
    assert server.stop() == 0


def test_silent_clients_cannot_lock_others_out_under_a_low_fd_limit(spawn: Spawn) -> None:
    import resource

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    server = ServerProcess(
        [*CLI, "--listen", PROXIED, "--handler", "twisted_world_handlers:AddressHandler",
         "--header-timeout", "60"],
        preexec_fn=low_fd_limit,
    )  # fmt: skip
    try:
        address = server.address()
        # More silent clients than the process has descriptors to spare; a
        # header timeout far beyond the test's waits, so it is not what saves us.
        silent = [connect(address) for _ in range(56)]
        try:
            with connect(address) as client:
                client.sendall(proxy_v1("10.9.8.7", 4242))
                reply = recv_all(client)
                assert b'"client": ["10.9.8.7", 4242]' in reply, server.output()
        finally:
            for sock in silent:
                sock.close()
        assert "while every slot was taken" in server.output()
        assert server.stop() == 0
        assert "Traceback" not in server.output()
    finally:
        server.kill()


def test_forking_mode_with_a_server_class_of_ones_own(spawn: Spawn) -> None:
    # --mode forking mixes ForkingMixIn into the --server class on the fly; the
    # workers get that class by value (it cannot be imported by name).
    server = spawn(
        *CLI, "--listen", TCP, "--handler", "twisted_world_handlers:AddressHandler",
        "--server", "txsocketserver:TCPServer", "--mode", "forking",
    )  # fmt: skip
    with connect(server.address()) as client:
        reply = json.loads(recv_line(client))
        assert reply["client"] == list(client.getsockname())
    assert "ForkingTCPServer" in server.output()
    assert server.stop() == 0
