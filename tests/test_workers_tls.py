"""``haproxy:ssl:`` under ``--workers``: the PROXY header in clear, then TLS,
in every worker, as a single process serves it: behind a real HAProxy
(``ssl verify none send-proxy-v2``, presenting a client certificate), for
synchronous, threading and async handlers; the trust list refuses other
peers; a SIGHUP reload gives the next workers the new certificate; and
``ssl:`` listeners of forking workers, whose children do the handshake
(``haproxy:ssl:`` under forking workers: ``tests/test_forking_proxy.py``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from support import LOCALHOST, WAIT, connect, recv_line, wait_until
from test_haproxy_interop import HAPROXY, accepting, free_port, haproxy_with
from test_twistd_cli import CLI, Spawn, spawn  # noqa: F401 - spawn: the fixture
from test_workers import START, wait_for_workers
from tls_pki import Issued, make_authority

HANDLERS = {
    "sync": "test_workers_tls:PeerReport",
    "threading": "test_workers_tls:PeerReport",
    "async": "test_workers_tls:AsyncPeerReport",
}


def _report(request: Any, client_address: Any) -> bytes:
    certificate = request.getpeercert()
    subject = dict(pair[0] for pair in certificate["subject"]) if certificate else {}
    der = request.getpeercert(binary_form=True)
    serial = None
    if der is not None:
        from cryptography import x509

        serial = x509.load_der_x509_certificate(der).serial_number
    header = getattr(request, "proxy_header", None)
    reply = {
        "authority": header.tlvs.authority if header is not None else None,
        "pid": os.getpid(),
        "client": list(client_address),
        "version": request.version(),
        "peer": subject.get("commonName"),
        "peer_serial": serial,
    }
    return json.dumps(reply).encode() + b"\n"


class PeerReport(txsocketserver.StreamRequestHandler):
    """One line in; a JSON line out: the worker, the client, its TLS."""

    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(_report(self.request, self.client_address))


class AsyncPeerReport(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        await self.rfile.readline()
        self.wfile.write(_report(self.request, self.client_address))


class PKI:
    def __init__(self, directory: Path) -> None:
        self.dir = str(directory)
        self.ca = make_authority(self.dir, "backends")
        self.server = self.ca.issue(self.dir, "localhost")
        self.proxy = self.ca.issue(self.dir, "haproxy", client=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("workers-pki"))


def haproxy_ssl(server: Issued, **options: str) -> str:
    extra = "".join(f":{k}={quoteStringArgument(v)}" for k, v in options.items())
    return (
        f"haproxy:ssl:0:interface={LOCALHOST}"
        f":privateKey={quoteStringArgument(server.key_path)}"
        f":certKey={quoteStringArgument(server.cert_path)}{extra}"
    )


def combined(directory: str, issued: Issued) -> str:
    path = f"{directory}/{os.path.basename(issued.cert_path)}.combined.pem"
    with open(path, "wb") as pem:
        for part in (issued.cert_path, issued.key_path):
            with open(part, "rb") as f:
                pem.write(f.read())
    return path


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)")
@pytest.mark.parametrize("mode", HANDLERS)
def test_haproxy_ssl_workers_behind_haproxy(mode: str, pki: PKI, spawn: Spawn) -> None:  # noqa: F811
    server = spawn(
        *CLI, "--workers", "2", "--mode", mode, "--handler", HANDLERS[mode],
        "--listen", haproxy_ssl(pki.server, clientCA=pki.ca.cert_path, handshakeTimeout="5"),
        "--trusted-proxies", LOCALHOST,
    )  # fmt: skip
    back = server.address()
    pids = wait_for_workers(server, 2)
    front = free_port()
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
        crt {combined(pki.dir, pki.proxy)} check check-send-proxy check-ssl inter 200
"""
    with haproxy_with(config):
        assert wait_until(lambda: accepting(front), 3 * WAIT)
        seen = set()
        for _ in range(6):
            with connect((LOCALHOST, front)) as client:
                port = client.getsockname()[1]
                client.sendall(b"hi\n")
                reply = json.loads(recv_line(client))
            # The real client, and the TLS between HAProxy and the worker,
            # with HAProxy's verified certificate.
            assert reply["client"] == [LOCALHOST, port]
            assert reply["version"] == "TLSv1.3"
            assert reply["peer"] == "haproxy"
            assert reply["pid"] in pids
            seen.add(reply["pid"])
    assert seen <= pids
    assert server.stop() == 0
    assert "Traceback" not in server.output()


def v2_header(authority: bytes) -> bytes:
    """A PROXY v2 header from 198.51.100.7:40123 with an authority (SNI) TLV."""
    tlv = struct.pack("!BH", 0x02, len(authority)) + authority
    addresses = socket.inet_aton("198.51.100.7") + socket.inet_aton(LOCALHOST)
    addresses += struct.pack("!HH", 40123, 443)
    body = addresses + tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def proxied_tls(address: tuple[str, int], pki: PKI, header: bytes | None = None) -> dict[str, Any]:
    """What HAProxy does, by hand: a PROXY header in clear (v1 unless
    *header*), then TLS."""
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    context.load_cert_chain(pki.proxy.cert_path, pki.proxy.key_path)
    with connect(address) as raw:
        raw.sendall(header or f"PROXY TCP4 198.51.100.7 {address[0]} 40123 443\r\n".encode())
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"hi\n")
            reply: dict[str, Any] = json.loads(recv_line(client))
            reply["served_serial"] = _serial(client.getpeercert(binary_form=True))
            return reply


def _serial(der: bytes | None) -> int:
    from cryptography import x509

    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_untrusted_peers_are_refused_and_trusted_ones_served(
    pki: PKI,
    spawn: Spawn,  # noqa: F811
) -> None:
    server = spawn(
        *CLI, "--workers", "2", "--mode", "threading", "--handler", HANDLERS["threading"],
        "--listen", haproxy_ssl(pki.server), "--trusted-proxies", "192.0.2.1",
    )  # fmt: skip
    address = server.address()
    wait_for_workers(server, 2)
    with connect(address) as raw:
        raw.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40123 443\r\n")
        raw.settimeout(WAIT)
        assert raw.recv(1) == b""  # closed before any TLS
    assert wait_until(lambda: "not a trusted proxy" in server.output(), WAIT), server.output()
    assert server.stop() == 0


def closed(sock: socket.socket) -> bool:
    """Whether the server closes *sock* (or resets it) within WAIT, sending nothing."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_header_deadline_and_handshake_timeout_hold_in_workers(
    pki: PKI,
    spawn: Spawn,  # noqa: F811
) -> None:
    server = spawn(
        *CLI, "--workers", "2", "--mode", "async", "--handler", HANDLERS["async"],
        "--listen", haproxy_ssl(pki.server, handshakeTimeout="0.5"),
        "--trusted-proxies", LOCALHOST, "--header-timeout", "0.5",
    )  # fmt: skip
    address = server.address()
    wait_for_workers(server, 2)
    with connect(address) as silent:
        assert closed(silent)  # no header: closed at the header deadline
    assert wait_until(lambda: "PROXY header" in server.output(), WAIT), server.output()
    with connect(address) as no_tls:
        no_tls.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40123 443\r\n")
        assert closed(no_tls)  # a header, then no handshake: closed at handshakeTimeout
    assert wait_until(lambda: "TLS handshake" in server.output(), WAIT), server.output()
    assert proxied_tls(address, pki)["client"] == ["198.51.100.7", 40123]
    assert server.stop() == 0


def test_a_reload_gives_the_next_workers_the_new_certificate(
    pki: PKI,
    spawn: Spawn,  # noqa: F811
    tmp_path: Path,
) -> None:
    site = pki.ca.issue(str(tmp_path), "localhost", serial=3001, prefix="site")
    server = spawn(
        *CLI, "--workers", "2", "--mode", "threading", "--handler", HANDLERS["threading"],
        "--listen", haproxy_ssl(site, clientCA=pki.ca.cert_path),
        "--trusted-proxies", LOCALHOST, "--header-timeout", "5",
    )  # fmt: skip
    address = server.address()
    wait_for_workers(server, 2)
    reply = proxied_tls(address, pki)
    assert reply["client"] == ["198.51.100.7", 40123]
    assert reply["peer"] == "haproxy"
    assert reply["served_serial"] == 3001
    # A v2 header's TLVs reach the handler too.
    tlvs = proxied_tls(address, pki, header=v2_header(b"api.example"))
    assert tlvs["authority"] == "api.example"
    assert tlvs["client"] == ["198.51.100.7", 40123]
    pki.ca.issue(str(tmp_path), "localhost", serial=3002, prefix="site")
    server.process.send_signal(signal.SIGHUP)
    wait_for_workers(server, 2, generation=1)
    assert wait_until(lambda: proxied_tls(address, pki)["served_serial"] == 3002, START)
    assert server.stop() == 0


def test_forking_workers_serve_ssl(
    pki: PKI,
    spawn: Spawn,  # noqa: F811
) -> None:
    description = haproxy_ssl(pki.server).removeprefix("haproxy:")
    server = spawn(
        *CLI, "--workers", "2", "--mode", "forking", "--handler", HANDLERS["sync"],
        "--listen", f"{description}:clientCA={quoteStringArgument(pki.ca.cert_path)}",
    )  # fmt: skip
    address = server.address()
    pids = wait_for_workers(server, 2)
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    context.load_cert_chain(pki.proxy.cert_path, pki.proxy.key_path)
    with connect(address) as raw, context.wrap_socket(raw, server_hostname="localhost") as client:
        client.sendall(b"hi\n")
        reply = json.loads(recv_line(client))
    assert reply["peer"] == "haproxy"
    assert reply["pid"] not in pids  # a worker's child
    assert server.stop() == 0


def test_library_haproxy_ssl_workers_bind(pki: PKI) -> None:
    from txsocketserver._workers.bound_sockets import bind_socket

    bound = bind_socket(haproxy_ssl(pki.server))
    try:
        spec = bound.worker_spec()
        assert spec["proxy"] == "haproxy:"
        assert spec["tls"] is not None and spec["tls"].startswith("ssl:")
    finally:
        bound.close()
    with pytest.raises(ValueError, match="reuse-port"):
        bind_socket(haproxy_ssl(pki.server), reuse_port=True)
    assert sys.modules["txsocketserver"] is txsocketserver
