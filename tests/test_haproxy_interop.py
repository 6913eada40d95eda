"""A real HAProxy (Debian's package, installed by ``.ci/run``) in front of a
``haproxy:`` endpoint: health checks, client addresses, and a fault mix.

HAProxy speaks PROXY v2 to us (``send-proxy-v2``) and health-checks us with
``check check-send-proxy`` (a PROXY ``LOCAL`` header, then a close): the
checks must stay quiet and make no handler, and every relayed request must
reach its handler with the address of the client that made it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.logger import formatEvent

import txsocketserver
from support import (
    LOCALHOST,
    WAIT,
    connect,
    fd_count,
    recv_all,
    serve_in_thread,
    settle_resources,
    thread_count,
    wait_until,
    warm_up,
)
from twisted_world_handlers import AddressHandler, MeasuredReplyHandler, measured_reply

HAPROXY = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)"
)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def haproxy(backend: tuple[str, int], ready: Callable[[], bool]) -> Iterator[tuple[str, int]]:
    """HAProxy relaying a frontend port to *backend* with PROXY v2, and
    health-checking it every 100 ms; yields the frontend address once
    *ready()* (HAProxy binds its frontend before it starts checking)."""
    front = free_port()
    config = f"""
global
    maxconn 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend front
    bind {LOCALHOST}:{front}
    default_backend back
backend back
    server app {backend[0]}:{backend[1]} send-proxy-v2 check check-send-proxy inter 100
"""
    with (
        tempfile.NamedTemporaryFile("w", suffix=".cfg") as config_file,
        tempfile.TemporaryFile() as output,
    ):
        config_file.write(config)
        config_file.flush()
        assert HAPROXY is not None
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", config_file.name],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:

            def checked() -> bool:
                assert process.poll() is None, "haproxy exited"
                return ready()

            assert wait_until(checked, 3 * WAIT), "haproxy sent no health check"
            yield LOCALHOST, front
        finally:
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)


def local_checks(events: list[dict[str, Any]]) -> int:
    return sum("PROXY LOCAL" in formatEvent(event) for event in list(events))


class RecordingAddressHandler(AddressHandler):
    def handle(self) -> None:
        self.server.handled += 1
        super().handle()


def test_health_checks_are_quiet_and_clients_keep_their_address(
    events: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    server = txsocketserver.ThreadingTCPServer(
        f"haproxy:tcp:0:interface={LOCALHOST}", RecordingAddressHandler
    )
    server.handled = 0
    with (
        server,
        serve_in_thread(server),
        haproxy(server.server_address, lambda: local_checks(events) >= 5) as front,
    ):
        for _ in range(20):
            with connect(front) as client:
                reply = recv_all(client)
                assert f'"client": ["127.0.0.1", {client.getsockname()[1]}]'.encode() in reply
        # The health checks are served too (as the proxy's own connections).
        assert server.handled >= 20
    failures = [event for event in events if "log_failure" in event]
    assert failures == [], [event["log_failure"].getTraceback() for event in failures]
    louder = [formatEvent(e) for e in events if e["log_level"].name != "debug"]
    assert louder == []
    assert "Traceback" not in capfd.readouterr().err


# -- the fault mix -------------------------------------------------------------------------

BODY = bytes(range(256)) * 16


def reset(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def normal(front: Any, back: Any) -> str:
    with connect(front) as client:
        client.sendall(b"%d\n" % len(BODY) + BODY)
        return hashlib.sha256(recv_all(client)).hexdigest()


def half_closed(front: Any, back: Any) -> str:
    with connect(front) as client:
        client.sendall(b"eof\n" + BODY)
        client.shutdown(socket.SHUT_WR)
        return hashlib.sha256(recv_all(client)).hexdigest()


def reset_mid_request(front: Any, back: Any) -> None:
    client = connect(front)
    client.sendall(b"%d\n" % len(BODY) + BODY[:100])
    reset(client)


def reset_before_header(front: Any, back: Any) -> None:
    reset(connect(back))


def reset_inside_header(front: Any, back: Any) -> None:
    client = connect(back)
    client.sendall(V2_SIGNATURE[:9])
    reset(client)


def split_header(front: Any, back: Any) -> str:
    addresses = (
        socket.inet_aton("10.7.7.7") + socket.inet_aton(LOCALHOST) + struct.pack("!HH", 7, 80)
    )
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12) + addresses
    with connect(back) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (header[:3], header[3:14], header[14:20], header[20:] + b"eof\n" + BODY):
            client.sendall(piece)
        client.shutdown(socket.SHUT_WR)
        return hashlib.sha256(recv_all(client)).hexdigest()


# Ten kinds of request in every ten: four normal, two half-closed, one of each fault.
MIX = (
    [normal] * 4
    + [half_closed] * 2
    + [split_header, reset_mid_request, reset_before_header, reset_inside_header]
)
REQUESTS = 3000
SILENT = 20


def test_fault_mix_through_haproxy(
    events: list[dict[str, Any]], capfd: pytest.CaptureFixture[str]
) -> None:
    warm_up(txsocketserver)
    # Twisted's first accept in a process opens the descriptor it keeps in
    # reserve for EMFILE: let that happen before the baseline.
    warm_server = txsocketserver.TCPServer(f"haproxy:tcp:0:interface={LOCALHOST}", AddressHandler)
    with warm_server, serve_in_thread(warm_server), connect(warm_server.server_address) as client:
        client.sendall(b"PROXY UNKNOWN\r\n")
        assert recv_all(client)
    expected = hashlib.sha256(measured_reply(BODY)).hexdigest()
    baseline_fds, baseline_threads = fd_count(), thread_count()
    server = txsocketserver.ThreadingTCPServer(
        f"haproxy:tcp:0:interface={LOCALHOST}", MeasuredReplyHandler
    )
    server.request_queue_size = 64
    server.header_timeout = 1.0
    server.cut_short = []
    per_kind = REQUESTS // len(MIX)

    def lines(*texts: str) -> int:
        return sum(any(t in formatEvent(event) for t in texts) for event in list(events))

    with (
        server,
        serve_in_thread(server),
        haproxy(server.server_address, lambda: local_checks(events) >= 1) as front,
    ):
        back = server.server_address
        silent = [connect(back) for _ in range(SILENT)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda i: MIX[i % len(MIX)](front, back), range(REQUESTS)))
        for client in silent:
            assert recv_all(client) == b""  # cut off by the header deadline
            client.close()
        served = [outcome for outcome in outcomes if outcome is not None]
        assert len(served) == REQUESTS * 7 // 10
        assert served == [expected] * len(served)
        assert wait_until(lambda: lines("inside its PROXY header") >= per_kind)
        assert wait_until(lambda: lines("no complete PROXY header") >= SILENT)
        assert wait_until(lambda: lines("was reset before", "closed before") >= per_kind)
    # One line for each connection that never reached a handler, nothing else.
    assert lines("inside its PROXY header") == per_kind
    assert lines("no complete PROXY header") == SILENT
    # A client reset mid-request reaches the handler (cut short, or a
    # connection ended before its first byte: a debug line) unless HAProxy
    # dropped it before connecting to us (then a header-stage line).
    before = lines("was reset before", "closed before")
    ended = lines("ended before sending anything")
    assert per_kind <= before <= 2 * per_kind
    # HAProxy's health checks are served as its own (LOCAL), and close at once:
    # their handlers, too, see a request cut short.
    cut_short = len(server.cut_short) - local_checks(events)
    assert before - per_kind + ended + cut_short <= per_kind
    known = ("PROXY LOCAL", "before sending anything", "inside its PROXY header", "no complete")
    assert [m for m in map(formatEvent, events) if not any(k in m for k in known)] == []
    assert not [event for event in events if "log_failure" in event]
    assert "Traceback" not in capfd.readouterr().err
    settle_resources(baseline_fds, baseline_threads)


# -- TLS: HAProxy's TLVs (send-proxy-v2-ssl-cn), and haproxy:ssl: behind HAProxy -------


@contextlib.contextmanager
def haproxy_with(config: str) -> Iterator[None]:
    """HAProxy running *config* (its frontend ports are the caller's to wait for)."""
    with (
        tempfile.NamedTemporaryFile("w", suffix=".cfg") as config_file,
        tempfile.TemporaryFile() as output,
    ):
        config_file.write(config)
        config_file.flush()
        assert HAPROXY is not None
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", config_file.name],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        finally:
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)
            output.seek(0)
            log = output.read().decode(errors="replace")
            assert "ALERT" not in log, log


def accepting(port: int) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=WAIT):
            return True
    except OSError:
        return False


class TLVReport(txsocketserver.StreamRequestHandler):
    """Answers with what the PROXY header's TLVs say, as JSON."""

    def handle(self) -> None:
        import json

        tlvs = self.request.proxy_header.tlvs
        ssl_facts = tlvs.ssl._asdict() if tlvs.ssl else None
        if ssl_facts:
            ssl_facts["other"] = sorted(ssl_facts["other"])
        report = {
            "client": self.client_address,
            "authority": tlvs.authority,
            "alpn": tlvs.alpn.decode() if tlvs.alpn else None,
            "unique_id": tlvs.unique_id.decode() if tlvs.unique_id else None,
            "ssl": ssl_facts,
            "crc": 0x03 in tlvs.raw,
        }
        self.wfile.write(json.dumps(report).encode() + b"\n")


def combined_pem(directory: str, issued: Any) -> str:
    path = f"{directory}/haproxy.pem"
    with open(path, "wb") as pem:
        for part in (issued.cert_path, issued.key_path):
            with open(part, "rb") as f:
                pem.write(f.read())
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tls_pki import make_authority

    directory = str(tmp_path_factory.mktemp("haproxy-pki"))
    ca = make_authority(directory, "front")
    return {
        "dir": directory,
        "ca": ca,
        "server": ca.issue(directory, "localhost"),
        "client": ca.issue(directory, "billing", client=True),
    }


def test_haproxy_tls_facts_reach_the_handler_as_tlvs(pki: Any) -> None:
    import json
    import ssl

    ca, client_cert = pki["ca"], pki["client"]
    front = free_port()
    with (
        txsocketserver.ThreadingTCPServer(
            f"haproxy:tcp:0:interface={LOCALHOST}", TLVReport
        ) as server,
        serve_in_thread(server),
    ):
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
    bind {LOCALHOST}:{front} ssl crt {combined_pem(pki["dir"], pki["server"])} \
        ca-file {ca.cert_path} verify optional alpn h2,http/1.1
    unique-id-format req-%Ts-%rt
    default_backend back
backend back
    server app {back[0]}:{back[1]} send-proxy-v2-ssl-cn \
        proxy-v2-options authority,unique-id,ssl-cipher,cert-sig,cert-key,crc32c
"""
        with haproxy_with(config):
            assert wait_until(lambda: accepting(front), 3 * WAIT)
            context = ssl.create_default_context(cafile=ca.cert_path)
            context.load_cert_chain(client_cert.cert_path, client_cert.key_path)
            context.set_alpn_protocols(["http/1.1"])
            with connect((LOCALHOST, front)) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    port = tls.getsockname()[1]
                    tls.sendall(b"hi\n")
                    report = json.loads(tls.makefile("rb").readline())
    assert report["client"] == [LOCALHOST, port]
    assert report["authority"] == "localhost"
    assert report["alpn"] == "http/1.1"
    assert report["unique_id"].startswith("req-")
    assert report["crc"] is True
    facts = report["ssl"]
    assert facts["client_ssl"] and facts["client_cert_connection"] and facts["verified"]
    assert facts["cn"] == "billing"
    assert facts["version"] == "TLSv1.3"
    assert facts["cipher"].startswith("TLS_")
    assert facts["sig_alg"] and facts["key_alg"]


class TLSClientReport(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        line = f"{self.client_address[0]} {self.client_address[1]} {self.request.version()}\n"
        self.wfile.write(line.encode())


class AsyncTLSClientReport(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        await self.rfile.readline()
        line = f"{self.client_address[0]} {self.client_address[1]} {self.request.version()}\n"
        self.wfile.write(line.encode())


HAPROXY_SSL_KINDS = {
    "sync": (txsocketserver.TCPServer, TLSClientReport),
    "threading": (txsocketserver.ThreadingTCPServer, TLSClientReport),
    "async": (txsocketserver.TCPServer, AsyncTLSClientReport),
}


@pytest.mark.parametrize("kind", HAPROXY_SSL_KINDS)
def test_haproxy_ssl_behind_haproxy_send_proxy_v2_to_a_tls_server(
    kind: str, pki: Any, events: list[dict[str, Any]]
) -> None:
    """HAProxy's ``ssl verify none send-proxy-v2``: the PROXY header in
    clear, then TLS; the handler sees the real client and TLS."""
    from twisted.internet.endpoints import quoteStringArgument

    server_class, handler = HAPROXY_SSL_KINDS[kind]
    served = pki["server"]
    description = (
        f"haproxy:ssl:0:interface={LOCALHOST}"
        f":privateKey={quoteStringArgument(served.key_path)}"
        f":certKey={quoteStringArgument(served.cert_path)}"
    )
    front = free_port()
    with server_class(description, handler) as server, serve_in_thread(server):
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
        check check-send-proxy check-ssl inter 100
"""
        with haproxy_with(config):
            assert wait_until(lambda: accepting(front), 3 * WAIT)
            for _ in range(3):
                with connect((LOCALHOST, front)) as client:
                    port = client.getsockname()[1]
                    client.sendall(b"hi\n")
                    assert recv_all(client) == f"{LOCALHOST} {port} TLSv1.3\n".encode()
            # Its TLS health checks (a LOCAL header, then a handshake) are served quietly.
            assert wait_until(lambda: local_checks(events) >= 1, 3 * WAIT)
    warnings = [formatEvent(e) for e in events if e["log_level"].name in ("warn", "error")]
    assert warnings == []
