"""TLS and PROXY refusals are counted through the request lifecycle
(``server.add_observer``): a failed or timed-out handshake ends its record
as ``refused:tls_handshake``, on every TLS path; behind ``haproxy:ssl:`` an
untrusted peer is ``refused:untrusted_proxy`` and a bad header
``refused:proxy_header``."""

from __future__ import annotations

import ssl
import threading
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from support import LOCALHOST, WAIT, connect, serve_in_thread, wait_until
from tls_pki import Issued, make_authority


class Outcomes:
    """Records each ended connection's outcome."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def accepted(self, record: Any) -> None:
        pass

    def refused(self, record: Any) -> None:
        pass

    def started(self, record: Any) -> None:
        pass

    def ended(self, record: Any) -> None:
        with self.lock:
            self.seen.append(record.outcome)


class Echo(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class AsyncEcho(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        self.wfile.write(await self.rfile.readline())


KINDS = {
    "threading": (txsocketserver.ThreadingTCPServer, Echo),
    "async": (txsocketserver.TCPServer, AsyncEcho),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = str(tmp_path_factory.mktemp("counted"))
    ca, other = make_authority(directory, "ours"), make_authority(directory, "theirs")
    return {
        "ca": ca,
        "server": ca.issue(directory, "localhost"),
        "stranger": other.issue(directory, "stranger", client=True),
    }


def description(server: Issued, ca: Any, prefix: str = "") -> str:
    return (
        f"{prefix}ssl:0:interface={LOCALHOST}"
        f":privateKey={quoteStringArgument(server.key_path)}"
        f":certKey={quoteStringArgument(server.cert_path)}"
        f":clientCA={quoteStringArgument(ca.cert_path)}:handshakeTimeout=0.5"
    )


def v1_header() -> bytes:
    return b"PROXY TCP4 10.1.2.3 127.0.0.1 4000 443\r\n"


def try_tls(address: Any, pki: dict[str, Any], header: bytes = b"") -> None:
    context = ssl.create_default_context(cafile=pki["ca"].cert_path)
    context.load_cert_chain(pki["stranger"].cert_path, pki["stranger"].key_path)
    with connect(address) as raw:
        raw.sendall(header)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hi\n")
                if tls.recv(16) == b"":
                    raise ConnectionResetError("closed")


def silent(address: Any, header: bytes = b"") -> None:
    with connect(address) as raw:
        raw.sendall(header)
        raw.settimeout(WAIT)
        try:
            assert raw.recv(1) == b""
        except ConnectionError:
            pass


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prefix", ["", "haproxy:"])
def test_handshake_refusals_are_counted(kind: str, prefix: str, pki: dict[str, Any]) -> None:
    server_class, handler = KINDS[kind]
    header = v1_header() if prefix else b""
    outcomes = Outcomes()
    with server_class(description(pki["server"], pki["ca"], prefix), handler) as server:
        server.add_observer(outcomes)
        with serve_in_thread(server):
            try_tls(server.server_address, pki, header)
            silent(server.server_address, header)
            assert wait_until(lambda: len(outcomes.seen) >= 2, WAIT), outcomes.seen
    assert outcomes.seen == ["refused:tls_handshake", "refused:tls_handshake"]


@pytest.mark.parametrize("kind", KINDS)
def test_haproxy_ssl_refusals_are_counted(kind: str, pki: dict[str, Any]) -> None:
    server_class, handler = KINDS[kind]
    outcomes = Outcomes()
    with server_class(description(pki["server"], pki["ca"], "haproxy:"), handler) as server:
        server.add_observer(outcomes)
        with serve_in_thread(server):
            server.trusted_proxies = ("192.0.2.1",)
            silent(server.server_address, v1_header())
            server.trusted_proxies = ("127.0.0.1",)
            silent(server.server_address, b"GET / HTTP/1.0\r\n\r\n")
            assert wait_until(lambda: len(outcomes.seen) >= 2, WAIT), outcomes.seen
    assert outcomes.seen == ["refused:untrusted_proxy", "refused:proxy_header"]
