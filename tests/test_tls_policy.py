"""TLS policy per ``ssl:`` listener (``minVersion``, ``maxVersion``,
``ciphers``, ``alpn``, ``handshakeTimeout``), its defaults tested rather than
assumed (TLS 1.0/1.1 refused, no compression, no renegotiation), and every
wrong value a clear error naming the option when the server is made.

Each behaviour is checked on both TLS paths: a connection the server accepts
itself (``ssl.SSLSocket``, synchronous and threading handlers) and one
Twisted's TLS carries (async handlers, ``haproxy:ssl:``).
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from support import (
    LOCALHOST,
    WAIT,
    SelfSignedCert,
    connect,
    fd_count,
    serve_in_thread,
    wait_until,
)

OPENSSL = shutil.which("openssl")


class FactsHandler(txsocketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        facts = {
            "version": self.request.version(),
            "cipher": self.request.cipher()[0],
            "alpn": self.request.selected_alpn_protocol(),
            "compression": getattr(self.request, "compression", lambda: None)(),
        }
        self.wfile.write(json.dumps(facts).encode() + b"\n")


class AsyncFactsHandler(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        await self.rfile.readline()
        facts = {
            "version": self.request.version(),
            "cipher": self.request.cipher()[0],
            "alpn": self.request.selected_alpn_protocol(),
            "compression": None,
        }
        self.wfile.write(json.dumps(facts).encode() + b"\n")


KINDS = {"threading": FactsHandler, "async": AsyncFactsHandler}


def description(cert: SelfSignedCert, **options: str) -> str:
    extra = "".join(f":{k}={quoteStringArgument(v)}" for k, v in options.items())
    return (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}{extra}"
    )


def make_server(kind: str, address: str) -> Any:
    if kind == "async":
        return txsocketserver.TCPServer(address, AsyncFactsHandler)

    class Server(txsocketserver.ThreadingTCPServer):
        daemon_threads = True

    return Server(address, FactsHandler)


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def facts(server: Any, cert: SelfSignedCert, **client: Any) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=cert.cert_path)
    for name, value in client.items():
        if name == "alpn":
            context.set_alpn_protocols(value)
        elif name == "ciphers":
            context.set_ciphers(value)
        else:
            setattr(context, name, value)
    with connect(server.server_address) as raw:
        with context.wrap_socket(raw, server_hostname=LOCALHOST) as tls:
            tls.sendall(b"hello\n")
            with tls.makefile("rb") as lines:
                return json.loads(lines.readline())  # type: ignore[no-any-return]


@pytest.fixture
def serve(kind: str) -> Iterator[Any]:
    """Start a server of the test's kind on an ``ssl:`` description."""
    started: list[Any] = []

    def start(address: str) -> Any:
        server = make_server(kind, address)
        started.append((server, serve_in_thread(server)))
        started[-1][1].__enter__()
        return server

    yield start
    for server, serving in reversed(started):
        serving.__exit__(None, None, None)
        server.server_close()


def openssl_refused(server: Any, *flags: str) -> str:
    """Run ``openssl s_client`` with *flags*; assert the handshake failed;
    return its output."""
    assert OPENSSL is not None
    run = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{LOCALHOST}:{server.server_address[1]}", *flags],
        input=b"",
        capture_output=True,
        timeout=2 * WAIT,
    )
    output = (run.stdout + run.stderr).decode(errors="replace")
    assert run.returncode != 0, output
    assert "Cipher is (NONE)" in output or "alert" in output or "error" in output, output
    return output


def handshake_failures(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("reason")) for e in events if "TLS handshake" in e.get("log_format", "")]


# --- the defaults, tested ------------------------------------------------------------


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize("old", ["-tls1", "-tls1_1"])
def test_tls_1_0_and_1_1_are_refused_by_default(
    serve: Any, tls_cert: SelfSignedCert, old: str, events: list[dict[str, Any]]
) -> None:
    server = serve(description(tls_cert))
    # SECLEVEL=0: the client itself would refuse these versions otherwise,
    # and the test is that the *server* does.
    openssl_refused(server, old, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert wait_until(lambda: handshake_failures(events), WAIT)
    assert "UNSUPPORTED_PROTOCOL" in handshake_failures(events)[0].upper().replace(" ", "_")
    assert facts(server, tls_cert)["version"] == "TLSv1.3"


def test_no_compression(serve: Any, tls_cert: SelfSignedCert, kind: str) -> None:
    server = serve(description(tls_cert, maxVersion="TLSv1.2"))
    context = ssl.create_default_context(cafile=tls_cert.cert_path)
    context.options &= ~ssl.OP_NO_COMPRESSION  # the client asks for it
    with connect(server.server_address) as raw:
        with context.wrap_socket(raw, server_hostname=LOCALHOST) as tls:
            assert tls.compression() is None


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_no_renegotiation(serve: Any, tls_cert: SelfSignedCert) -> None:
    server = serve(description(tls_cert, maxVersion="TLSv1.2"))
    assert OPENSSL is not None
    # s_client renegotiates when a read of its input starts with "R"; the
    # server answers with a no_renegotiation alert.
    run = subprocess.run(
        [
            OPENSSL, "s_client", "-connect", f"{LOCALHOST}:{server.server_address[1]}",
            "-CAfile", tls_cert.cert_path,
        ],
        input=b"R\n",
        capture_output=True,
        timeout=2 * WAIT,
    )  # fmt: skip
    output = (run.stdout + run.stderr).decode(errors="replace")
    assert "RENEGOTIATING" in output
    assert "no renegotiation" in output, output


# --- the options ------------------------------------------------------------------------


def test_min_version_tls_1_3_refuses_tls_1_2(
    serve: Any, tls_cert: SelfSignedCert, events: list[dict[str, Any]]
) -> None:
    server = serve(description(tls_cert, minVersion="TLSv1.3"))
    with pytest.raises(ssl.SSLError):
        facts(server, tls_cert, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert wait_until(lambda: handshake_failures(events), WAIT)
    assert facts(server, tls_cert)["version"] == "TLSv1.3"


def test_max_version_and_ciphers(serve: Any, tls_cert: SelfSignedCert) -> None:
    cipher = "ECDHE-ECDSA-CHACHA20-POLY1305"
    server = serve(description(tls_cert, maxVersion="TLSv1.2", ciphers=cipher))
    seen = facts(server, tls_cert)
    assert seen["version"] == "TLSv1.2"
    assert seen["cipher"] == cipher
    with pytest.raises(ssl.SSLError):
        facts(server, tls_cert, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")


def test_alpn_is_negotiated_and_visible_to_the_handler(
    serve: Any, tls_cert: SelfSignedCert
) -> None:
    server = serve(description(tls_cert, alpn="h2,http/1.1"))
    assert facts(server, tls_cert, alpn=["http/1.1"])["alpn"] == "http/1.1"
    # The server's order of preference wins.
    assert facts(server, tls_cert, alpn=["http/1.1", "h2"])["alpn"] == "h2"
    assert facts(server, tls_cert)["alpn"] is None


def test_a_silent_client_is_closed_at_the_handshake_deadline(
    serve: Any, tls_cert: SelfSignedCert, events: list[dict[str, Any]]
) -> None:
    server = serve(description(tls_cert, handshakeTimeout="0.5"))
    with connect(server.server_address) as silent:
        started = time.monotonic()
        assert closed(silent)
        assert time.monotonic() - started < WAIT
    assert wait_until(lambda: any("timed out" in e.get("log_format", "") for e in events), WAIT)
    assert facts(server, tls_cert)["version"] == "TLSv1.3"


def test_a_trickled_client_hello_is_closed_at_the_deadline(
    serve: Any, tls_cert: SelfSignedCert
) -> None:
    """One byte of ClientHello every 0.1 s would keep a per-read timeout
    from ever firing; the handshake deadline counts from the start."""
    server = serve(description(tls_cert, handshakeTimeout="0.5"))
    hello = client_hello()
    with connect(server.server_address) as trickler:
        trickler.settimeout(0.1)
        started = time.monotonic()
        cut = False
        for byte in hello:
            try:
                trickler.sendall(bytes([byte]))
                if trickler.recv(1) == b"":
                    cut = True
                    break
            except TimeoutError:
                continue  # the pace of the trickle, not a synchronisation
            except ConnectionError:
                cut = True
                break
        assert cut, "the server waited for the whole trickled ClientHello"
        assert time.monotonic() - started < 0.5 + WAIT
        assert len(hello) * 0.1 > 1.0  # the trickle would have outlasted the deadline


def closed(sock: socket.socket) -> bool:
    """Whether the server closes *sock* within WAIT (EOF or reset)."""
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def client_hello() -> bytes:
    """The bytes of a real ClientHello (what a TLS client sends first)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --- bad input: a clear error naming the option, when the server is made ----------------


BAD_OPTIONS = [
    ({"minVersion": "TLSv1.1"}, "minVersion"),
    ({"minVersion": "tls13"}, "minVersion"),
    ({"maxVersion": "SSLv3"}, "maxVersion"),
    ({"minVersion": "TLSv1.3", "maxVersion": "TLSv1.2"}, "maxVersion"),
    ({"ciphers": "NO-SUCH-CIPHER"}, "ciphers"),
    ({"clientCA": "/nonexistent/ca.pem"}, "clientCA"),
    ({"verifyClient": "maybe"}, "verifyClient"),
    ({"verifyClient": "required"}, "verifyClient"),
    ({"alpn": "h2,,http/1.1"}, "alpn"),
    ({"handshakeTimeout": "-1"}, "handshakeTimeout"),
    ({"handshakeTimeout": "0"}, "handshakeTimeout"),
    ({"handshakeTimeout": "soon"}, "handshakeTimeout"),
    ({"handshakeTimeout": "inf"}, "handshakeTimeout"),
    ({"sslmethod": "TLSv1_2_METHOD", "minVersion": "TLSv1.2"}, "sslmethod"),
]


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
@pytest.mark.parametrize("prefix", ["", "haproxy:"])
def test_a_wrong_option_value_is_an_error_naming_the_option(
    tls_cert: SelfSignedCert, kind: str, options: dict[str, str], named: str, prefix: str
) -> None:
    fds = fd_count()
    handler = KINDS[kind]
    with pytest.raises(ValueError, match=rf"\b{named}\b"):
        txsocketserver.TCPServer(prefix + description(tls_cert, **options), handler)
    assert fd_count() == fds


def test_an_option_given_twice_is_an_error(tls_cert: SelfSignedCert) -> None:
    with pytest.raises(ValueError, match="alpn is given twice"):
        txsocketserver.TCPServer(description(tls_cert) + ":alpn=h2:alpn=h3", FactsHandler)


def test_our_options_reach_twisted_unquoted_correctly(
    serve: Any, tls_cert: SelfSignedCert, tmp_path: Any
) -> None:
    """A path with a colon, escaped as Twisted's syntax says, still names the file."""
    odd = tmp_path / "ca:odd.pem"
    odd.write_bytes(Path(tls_cert.cert_path).read_bytes())
    server = serve(description(tls_cert, clientCA=str(odd), verifyClient="optional"))
    assert facts(server, tls_cert)["version"] == "TLSv1.3"
