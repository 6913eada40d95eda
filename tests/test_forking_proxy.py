"""A forking server behind ``haproxy:`` (``_twisted/proxied_sockets.py``):
the serving process reads exactly the PROXY header, and the child gets the
real socket, with the client's address and every byte after the header.

Behind a real HAProxy (``send-proxy``, ``send-proxy-v2``, and ``ssl verify
none send-proxy-v2`` to ``haproxy:ssl:``, whose handshake the child does),
in both fork modes; the trust list, the header deadline and the lifecycle's
refusals hold; and ``python -m txsocketserver --mode forking`` serves
``haproxy:`` with and without ``--workers``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

import txsocketserver
from support import (
    LOCALHOST,
    WAIT,
    connect,
    fd_count,
    recv_line,
    serve_in_thread,
    settle_resources,
    systemd_activation,
    thread_count,
    unix_socket_path,
    wait_until,
)
from test_haproxy_interop import HAPROXY, accepting, free_port, haproxy_with
from test_twistd_cli import CLI, Spawn, spawn  # noqa: F401 - spawn: the fixture
from test_workers import wait_for_workers
from test_workers_tls import PKI, PeerReport, combined, haproxy_ssl, proxied_tls

needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)"
)


class ClientReport(txsocketserver.StreamRequestHandler):
    """One line in (``bulk N``: N bytes follow); a JSON line out: the
    child's pid, the client, the request's type, and the bytes' digest."""

    def handle(self) -> None:
        line = self.rfile.readline()
        if not line:
            return  # a proxy's probe
        digest = None
        if line.startswith(b"bulk "):
            digest = hashlib.sha256(self.rfile.read(int(line.split()[1]))).hexdigest()
        reply = {
            "pid": os.getpid(),
            "client": list(self.client_address),
            "type": type(self.request).__name__,
            "line": line.decode(),
            "digest": digest,
        }
        self.wfile.write(json.dumps(reply).encode() + b"\n")


class TemplateServer(txsocketserver.ForkingTCPServer):
    fork_from = "template"


class ServerForkServer(txsocketserver.ForkingTCPServer):
    fork_from = "server"


class TLSTemplateServer(TemplateServer):
    pass


class TLSServerForkServer(ServerForkServer):
    pass


SERVERS = {"template": TemplateServer, "server": ServerForkServer}
TLS_SERVERS = {"template": TLSTemplateServer, "server": TLSServerForkServer}
DESCRIPTION = f"haproxy:tcp:0:interface={LOCALHOST}"


@pytest.fixture(params=["template", "server"])
def fork_from(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("forking-proxy-pki"))


class Steps:
    """A lifecycle observer: the refusals and the ends, as they come."""

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.outcomes: list[str] = []
        self.clients: list[Any] = []
        self._lock = threading.Lock()

    def accepted(self, record: Any) -> None:
        pass

    def started(self, record: Any) -> None:
        with self._lock:
            self.clients.append(record.client_address)

    def refused(self, record: Any) -> None:
        with self._lock:
            self.refusals.append(record.outcome)

    def ended(self, record: Any) -> None:
        with self._lock:
            self.outcomes.append(record.outcome)


def v1_header(client: tuple[str, int]) -> bytes:
    return f"PROXY TCP4 {client[0]} {LOCALHOST} {client[1]} 443\r\n".encode()


def v2_header(client: tuple[str, int]) -> bytes:
    addresses = socket.inet_aton(client[0]) + socket.inet_aton(LOCALHOST)
    addresses += struct.pack("!HH", client[1], 443)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12) + addresses


FIRST_REQUEST_WAIT = 30.0


def ask(address: Any, payload: bytes) -> dict[str, Any]:
    with connect(address) as client:
        # A server's first request waits for its template, a fresh
        # interpreter, which a loaded machine can take seconds to start.
        client.settimeout(FIRST_REQUEST_WAIT)
        client.sendall(payload)
        reply: dict[str, Any] = json.loads(recv_line(client))
        return reply


def refused(address: Any) -> bool:
    try:
        connect(address, timeout=1).close()
    except OSError:
        return True
    return False


def closed(sock: socket.socket) -> bool:
    """Whether the server closes *sock* (or resets it) within WAIT, sending nothing."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("header", [v1_header, v2_header], ids=["v1", "v2"])
def test_the_child_gets_the_socket_after_exactly_the_header(fork_from: str, header: Any) -> None:
    body = os.urandom(200_000)
    with SERVERS[fork_from](DESCRIPTION, ClientReport) as server, serve_in_thread(server):
        steps = Steps()
        server.add_observer(steps)
        # The header and the request in one segment: no byte after the
        # header may be read by the serving process.
        reply = ask(server.server_address, header(("198.51.100.7", 40123)) + b"one\n")
        assert reply["client"] == ["198.51.100.7", 40123]
        assert reply["line"] == "one\n"
        assert reply["type"] == "socket"
        assert reply["pid"] != os.getpid()
        payload = header(("203.0.113.9", 1234)) + b"bulk %d\n" % len(body) + body
        reply = ask(server.server_address, payload)
        assert reply["digest"] == hashlib.sha256(body).hexdigest()
        assert reply["client"] == ["203.0.113.9", 1234]
        assert wait_until(lambda: len(steps.outcomes) == 2, WAIT)
    assert steps.clients == [("198.51.100.7", 40123), ("203.0.113.9", 1234)]
    assert steps.outcomes == ["ok", "ok"]


def test_a_header_split_into_pieces_and_haproxy_unix(fork_from: str) -> None:
    baseline_fds, baseline_threads = fd_count(), thread_count()
    with unix_socket_path() as path:
        server = SERVERS[fork_from](f"haproxy:unix:{path}", ClientReport)
        with server, serve_in_thread(server):
            assert server.address_family == socket.AF_UNIX
            for header in (v1_header, v2_header):
                whole = header(("198.51.100.7", 9)) + b"bulk 5\nhello"
                with connect(path, socket.AF_UNIX) as client:
                    # However the pieces arrive, the header and not a byte more.
                    for start in range(0, len(whole), 7):
                        client.sendall(whole[start : start + 7])
                    reply = json.loads(recv_line(client))
                assert reply["client"] == ["198.51.100.7", 9]
                assert reply["digest"] == hashlib.sha256(b"hello").hexdigest()
        assert not os.path.exists(path)
    settle_resources(baseline_fds, baseline_threads)


class CheckedServer(TemplateServer):
    """verify_request sees the address the header names."""

    seen: list[Any] = []

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.seen.append(client_address)
        return bool(client_address[0] != "192.0.2.66")


def test_verify_request_sees_the_real_client(events: list[dict[str, Any]]) -> None:
    with CheckedServer(DESCRIPTION, ClientReport) as server, serve_in_thread(server):
        steps = Steps()
        server.add_observer(steps)
        with connect(server.server_address) as refused:
            refused.sendall(v1_header(("192.0.2.66", 9)) + b"one\n")
            assert closed(refused)
        assert ask(server.server_address, v1_header(("192.0.2.67", 9)) + b"two\n")["line"]
    assert CheckedServer.seen[-2:] == [("192.0.2.66", 9), ("192.0.2.67", 9)]
    assert "refused:verify_request" in steps.refusals


def test_untrusted_peers_and_stalled_headers_are_refused_and_it_serves_on(
    fork_from: str, events: list[dict[str, Any]]
) -> None:
    from twisted.logger import formatEvent

    with SERVERS[fork_from](DESCRIPTION, ClientReport) as server, serve_in_thread(server):
        steps = Steps()
        server.add_observer(steps)
        server.trusted_proxies = ("192.0.2.1",)
        with connect(server.server_address) as untrusted:
            untrusted.sendall(v1_header(("198.51.100.7", 1)) + b"one\n")
            assert closed(untrusted)
        server.trusted_proxies = (LOCALHOST,)
        server.header_timeout = 0.3
        with connect(server.server_address) as stalled:
            stalled.sendall(b"PROXY TCP4 198.51")
            assert closed(stalled)
        with connect(server.server_address) as bad:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed(bad)
        reply = ask(server.server_address, v2_header(("198.51.100.8", 2)) + b"two\n")
        assert reply["client"] == ["198.51.100.8", 2]
        assert wait_until(lambda: len(steps.outcomes) == 4, WAIT)
    assert steps.refusals == [
        "refused:untrusted_proxy",
        "refused:proxy_header",
        "refused:proxy_header",
    ]
    assert steps.outcomes[-1] == "ok"
    logged = " ".join(formatEvent(e) for e in events)
    assert "not a trusted proxy" in logged
    assert "no complete PROXY header within 0.3s" in logged
    assert "not a PROXY protocol header" in logged


def test_a_full_queue_closes_silent_headers_to_make_room() -> None:
    with TemplateServer(DESCRIPTION, ClientReport) as server, serve_in_thread(server):
        server.header_timeout = None
        silent = [connect(server.server_address) for _ in range(server.request_queue_size)]
        try:
            # Every slot is taken by a silent client: the oldest are closed
            # to let this one in.
            reply = ask(server.server_address, v1_header(("198.51.100.7", 3)) + b"in\n")
            assert reply["client"] == ["198.51.100.7", 3]
        finally:
            for sock in silent:
                sock.close()


@needs_haproxy
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_behind_haproxy(fork_from: str, send_proxy: str) -> None:
    front = free_port()
    with SERVERS[fork_from](DESCRIPTION, ClientReport) as server, serve_in_thread(server):
        back = server.server_address
        config = f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind {LOCALHOST}:{front}
    default_backend back
backend back
    server app {back[0]}:{back[1]} {send_proxy}
"""
        with haproxy_with(config):
            assert wait_until(lambda: accepting(front), 3 * WAIT)
            body = os.urandom(100_000)
            for _ in range(3):
                with connect((LOCALHOST, front)) as client:
                    port = client.getsockname()[1]
                    client.sendall(b"bulk %d\n" % len(body) + body)
                    reply = json.loads(recv_line(client))
                assert reply["client"] == [LOCALHOST, port]
                assert reply["digest"] == hashlib.sha256(body).hexdigest()
                assert reply["pid"] != os.getpid()


@needs_haproxy
def test_haproxy_ssl_behind_haproxy_the_child_does_the_handshake(fork_from: str, pki: PKI) -> None:
    description = haproxy_ssl(pki.server, clientCA=pki.ca.cert_path, handshakeTimeout="5")
    front = free_port()
    with TLS_SERVERS[fork_from](description, PeerReport) as server, serve_in_thread(server):
        back = server.server_address
        config = f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind {LOCALHOST}:{front}
    default_backend back
backend back
    server app {back[0]}:{back[1]} ssl verify none send-proxy-v2 \
        crt {combined(pki.dir, pki.proxy)}
"""
        with haproxy_with(config):
            assert wait_until(lambda: accepting(front), 3 * WAIT)
            for _ in range(3):
                with connect((LOCALHOST, front)) as client:
                    port = client.getsockname()[1]
                    client.sendall(b"hi\n")
                    reply = json.loads(recv_line(client))
                assert reply["client"] == [LOCALHOST, port]
                assert reply["version"] == "TLSv1.3"
                assert reply["peer"] == "haproxy"  # HAProxy's certificate, verified
                assert reply["pid"] != os.getpid()
        # A header, then no TLS: the child's handshake fails, which is a
        # refusal, and the next connection is served.
        steps = Steps()
        server.add_observer(steps)
        with connect(back) as no_tls:
            no_tls.sendall(v1_header(("198.51.100.7", 4)) + b"not TLS\n")
            assert closed(no_tls)
        assert proxied_tls(back, pki)["client"] == ["198.51.100.7", 40123]
        assert wait_until(lambda: len(steps.outcomes) == 2, WAIT)
    assert steps.refusals == ["refused:tls_handshake"]


def test_cli_forking_serves_haproxy(spawn: Spawn) -> None:  # noqa: F811
    server = spawn(
        *CLI, "--mode", "forking", "--handler", "test_forking_proxy:ClientReport",
        "--listen", DESCRIPTION, "--header-timeout", "0.5",
    )  # fmt: skip
    address = server.address()
    reply = ask(address, v1_header(("198.51.100.7", 5)) + b"one\n")
    assert reply["client"] == ["198.51.100.7", 5]
    assert reply["pid"] != server.process.pid
    with connect(address) as stalled:
        assert closed(stalled)
    assert wait_until(lambda: "PROXY header" in server.output(), WAIT), server.output()
    assert server.stop() == 0


def test_cli_forking_workers_serve_haproxy(spawn: Spawn) -> None:  # noqa: F811
    server = spawn(
        *CLI, "--workers", "2", "--mode", "forking",
        "--handler", "test_forking_proxy:ClientReport", "--listen", DESCRIPTION,
    )  # fmt: skip
    address = server.address()
    pids = wait_for_workers(server, 2)
    for port in (6, 7, 8):
        reply = ask(address, v2_header(("198.51.100.7", port)) + b"one\n")
        assert reply["client"] == ["198.51.100.7", port]
        assert reply["pid"] not in pids  # a worker's child
    assert server.stop() == 0
    assert "Traceback" not in server.output()


def test_cli_forking_workers_serve_haproxy_ssl(pki: PKI, spawn: Spawn, tmp_path: Path) -> None:  # noqa: F811
    server = spawn(
        *CLI, "--workers", "2", "--mode", "forking",
        "--handler", "test_workers_tls:PeerReport",
        "--listen", haproxy_ssl(pki.server, clientCA=pki.ca.cert_path),
    )  # fmt: skip
    address = server.address()
    pids = wait_for_workers(server, 2)
    reply = proxied_tls(address, pki)
    assert reply["client"] == ["198.51.100.7", 40123]
    assert reply["peer"] == "haproxy"
    assert reply["version"] == "TLSv1.3"
    assert reply["pid"] not in pids
    assert server.stop() == 0


def test_cli_forking_refuses_what_it_cannot_hand_a_child(spawn: Spawn) -> None:  # noqa: F811
    # systemd: without haproxy: stays Twisted's to accept: its connections
    # are transports, which cannot cross to a child.
    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        fd = listening.fileno()
        process = spawn(
            *systemd_activation(fd, "app.socket"), "--mode", "forking",
            "--listen", "systemd:domain=INET:index=0",
            "--handler", "test_forking_proxy:ClientReport",
            pass_fds=(fd,),
        )  # fmt: skip
        assert process.finish() != 0
    assert "forking servers hand each child the accepted OS socket" in process.output()
    assert "Traceback" not in process.output()


def test_haproxy_in_front_of_twisted_tls_cannot_fork() -> None:
    # Twisted's own haproxy: in front of an ssl: endpoint object reads the
    # header inside TLS, in the serving process: refused when made.
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.protocols.haproxy import proxyEndpoint

    from txsocketserver._twisted.reactor import get_reactor

    inner = SSL4ServerEndpoint(get_reactor(), 0, None, interface=LOCALHOST)
    endpoint = txsocketserver.Endpoint(proxyEndpoint(inner))
    with pytest.raises(ValueError, match="a forking server behind haproxy: needs"):
        TemplateServer(endpoint, ClientReport)


def test_cli_forking_serves_haproxy_over_systemd_activation(spawn: Spawn) -> None:  # noqa: F811
    with socket.socket() as listening:
        listening.bind((LOCALHOST, 0))
        listening.listen()
        fd = listening.fileno()
        server = spawn(
            *systemd_activation(fd, "app.socket"), "--mode", "forking",
            "--listen", "haproxy:systemd:domain=INET:index=0",
            "--handler", "test_forking_proxy:ClientReport",
            pass_fds=(fd,),
        )  # fmt: skip
        address = listening.getsockname()
        assert server.address() == address
    reply = ask(address, v1_header(("198.51.100.7", 10)) + b"one\n")
    assert reply["client"] == ["198.51.100.7", 10]
    assert reply["pid"] != server.process.pid
    assert server.stop() == 0


def test_a_stop_serves_the_connections_still_in_their_header(fork_from: str) -> None:
    # A reload of --workers stops its old workers while clients arrive: one
    # accepted before the stop, still sending its header, is served.
    from txsocketserver._twisted.service import stop_gracefully

    server = SERVERS[fork_from](DESCRIPTION, ClientReport)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    listener = server._listener  # type: ignore[attr-defined]
    address = server.server_address
    stopper: threading.Thread | None = None
    header = v1_header(("198.51.100.7", 12))
    try:
        assert ask(address, v1_header(("198.51.100.7", 11)) + b"one\n")["client"][1] == 11
        with connect(address) as client:
            client.sendall(header[:10])
            assert wait_until(lambda: len(listener._pending) == 1, WAIT)
            result: list[bool] = []
            stopper = threading.Thread(
                target=lambda: result.append(
                    stop_gracefully(server, drain_timeout=WAIT, serving=serving)
                )
            )
            stopper.start()
            # No longer listening, in the template's copy of the socket either.
            assert wait_until(lambda: refused(address), WAIT)
            client.sendall(header[10:] + b"two\n")
            reply = json.loads(recv_line(client))
        assert reply["client"] == ["198.51.100.7", 12]
        stopper.join(WAIT)
        assert not stopper.is_alive() and result == [True]
    finally:
        if stopper is not None:
            stopper.join(WAIT)
        serving.join(WAIT)
        server.server_close()
