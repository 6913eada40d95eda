"""TLS on ``ssl:`` endpoint descriptions: real ``ssl.SSLSocket``\\ s, TLS in the handler's thread.

The stdlib has no TLS server of its own; its users wrap the accepted socket
in ``get_request`` (the idiom ``http.server``'s documentation shows).  The
differential tests run that idiom on ``socketserver`` against an ``ssl:``
endpoint on txsocketserver, with the same handler and the same verifying
client.  Where ours does better (the handshake never blocks the serving
thread, ``close_notify`` on close) the test is ours-only and says so.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import http.server
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from twisted.internet.endpoints import SSL4ServerEndpoint, quoteStringArgument
from twisted.internet.ssl import PrivateCertificate

import txsocketserver
from support import (
    LOCALHOST,
    WAIT,
    SelfSignedCert,
    connect,
    fd_count,
    reset_close,
    serve_in_thread,
    settle_resources,
    thread_count,
    wait_until,
    warm_up,
)
from twisted_world_handlers import (
    EchoHandler,
    FirehoseHandler,
    firehose_digest,
    receive_firehose_digest,
    stalled_firehose,
)
from txsocketserver._twisted.transport_socket import TransportSocket

SERVER_CLASSES = [txsocketserver.TCPServer, txsocketserver.ThreadingTCPServer]


def tls_description(cert: SelfSignedCert, **options: str) -> str:
    extra = "".join(f":{name}={quoteStringArgument(value)}" for name, value in options.items())
    return (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(cert.key_path)}"
        f":certKey={quoteStringArgument(cert.cert_path)}{extra}"
    )


def client_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def tls_connect(address: Any, cafile: str, **wrap: Any) -> ssl.SSLSocket:
    raw = connect(address)
    try:
        return client_context(cafile).wrap_socket(raw, server_hostname=LOCALHOST, **wrap)
    except BaseException:
        raw.close()
        raise


class Recording:
    """Server mix-in recording what handle_error saw instead of printing it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1])  # type: ignore[attr-defined]


def tls_server(ss: ModuleType, cert: SelfSignedCert, handler: Any) -> Any:
    """A threading TLS server: the stdlib's get_request idiom, or an ``ssl:`` endpoint."""
    if ss is socketserver:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert.cert_path, cert.key_path)

        class StdlibTLSServer(Recording, socketserver.ThreadingTCPServer):
            daemon_threads = True

            def get_request(self) -> tuple[Any, Any]:
                sock, address = super().get_request()
                return context.wrap_socket(sock, server_side=True), address

        server = StdlibTLSServer((LOCALHOST, 0), handler)
    else:

        class OurTLSServer(Recording, txsocketserver.ThreadingTCPServer):
            daemon_threads = True

        server = OurTLSServer(tls_description(cert), handler)
    server.errors = []
    return server


class KindHandler(txsocketserver.StreamRequestHandler):
    """Reply with the request's type and TLS version, then echo lines."""

    def handle(self) -> None:
        self.wfile.write(f"{type(self.request).__name__} {self.request.version()}\n".encode())
        for line in self.rfile:
            self.wfile.write(line)


class TimedHandler(socketserver.StreamRequestHandler):
    timeout = 0.3

    def handle(self) -> None:
        self.wfile.write(self.rfile.readline())


class ByeHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"bye\n")


# --- the basics ---------------------------------------------------------------


@pytest.mark.parametrize(
    "server_class", [txsocketserver.TCPServer, txsocketserver.ThreadingTCPServer]
)
def test_handlers_get_ssl_sockets_on_a_socket_of_the_servers_own(
    server_class: type, tls_cert: SelfSignedCert
) -> None:
    with server_class(tls_description(tls_cert), KindHandler) as server, serve_in_thread(server):
        assert type(server.socket) is socket.socket
        assert server.server_address[0] == LOCALHOST
        with (
            tls_connect(server.server_address, tls_cert.cert_path) as client,
            client.makefile("rwb") as lines,
        ):
            assert lines.readline() == b"SSLSocket TLSv1.3\n"
            for line in (b"one\n", b"two\n" * 1000):
                lines.write(line)
                lines.flush()
                assert lines.read(len(line)) == line


@pytest.mark.parametrize("ss", ["stdlib", "tx"], indirect=True)
def test_echo_and_big_transfers(ss: ModuleType, tls_cert: SelfSignedCert) -> None:
    payload = bytes(range(256)) * 8192 + b"\n"  # 2 MiB and a bit, one line
    with tls_server(ss, tls_cert, EchoHandler) as server, serve_in_thread(server):
        for _ in range(3):
            with tls_connect(server.server_address, tls_cert.cert_path) as client:
                client.sendall(payload)
                with client.makefile("rb") as replies:
                    received = replies.read(len(payload))
                assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert server.errors == []


@pytest.mark.parametrize("ss", ["stdlib", "tx"], indirect=True)
def test_simple_http_request_handler_over_tls(
    ss: ModuleType, tls_cert: SelfSignedCert, tmp_path: Path
) -> None:
    (tmp_path / "hello.txt").write_bytes(b"hello over TLS\n" * 1000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    with tls_server(ss, tls_cert, handler) as server, serve_in_thread(server):
        url = f"https://{LOCALHOST}:{server.server_address[1]}/hello.txt"
        context = client_context(tls_cert.cert_path)
        with urllib.request.urlopen(url, context=context, timeout=WAIT) as reply:
            assert reply.status == 200
            assert reply.read() == b"hello over TLS\n" * 1000
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url + ".missing", context=context, timeout=WAIT)
        assert missing.value.code == 404
        missing.value.close()


@pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl not installed (.ci/run installs it)"
)
def test_curl_over_tls(tls_cert: SelfSignedCert, tmp_path: Path) -> None:
    (tmp_path / "page.html").write_bytes(b"<p>curl</p>\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    with (
        txsocketserver.ThreadingTCPServer(tls_description(tls_cert), handler) as server,
        serve_in_thread(server),
    ):
        url = f"https://{LOCALHOST}:{server.server_address[1]}/page.html"
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--cacert", tls_cert.cert_path, url],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"<p>curl</p>\n"


@pytest.mark.parametrize("ss", ["stdlib", "tx"], indirect=True)
def test_handler_timeout_raises_timeout_error(ss: ModuleType, tls_cert: SelfSignedCert) -> None:
    with tls_server(ss, tls_cert, TimedHandler) as server, serve_in_thread(server):
        with tls_connect(server.server_address, tls_cert.cert_path) as client:
            # Handshake done; now say nothing for longer than the handler waits.
            assert wait_until(lambda: server.errors, timeout=WAIT)
            assert client.recv(1) == b""
        assert [type(error) for error in server.errors] == [TimeoutError]


# --- where ours differs from the stdlib idiom, on purpose ---------------------------


def test_a_silent_client_does_not_hold_up_the_others(tls_cert: SelfSignedCert) -> None:
    """The handshake runs in the handler's thread, not in get_request: a client
    that connects and never says hello costs one handler, not the whole
    server (the stdlib idiom would block accepting until it timed out)."""
    with (
        txsocketserver.ThreadingTCPServer(tls_description(tls_cert), EchoHandler) as server,
        serve_in_thread(server),
        connect(server.server_address) as silent,
    ):
        began = time.monotonic()
        with tls_connect(server.server_address, tls_cert.cert_path) as client:
            client.sendall(b"served\n")
            assert client.recv(64) == b"served\n"
        assert time.monotonic() - began < 2.0
        silent.close()


def test_the_handlers_timeout_bounds_the_handshake(tls_cert: SelfSignedCert) -> None:
    """A client that never says hello holds its thread no longer than the
    handler's timeout, as a silent client on a plain socket does; it is
    closed quietly, and server_close() does not wait for it."""

    class Server(Recording, txsocketserver.ThreadingTCPServer):
        pass

    server = Server(tls_description(tls_cert), TimedHandler)  # timeout = 0.3
    server.errors = []
    with server, serve_in_thread(server), connect(server.server_address) as silent:
        began = time.monotonic()
        assert silent.recv(1) == b""  # closed by the server
        assert time.monotonic() - began < 3.0
        assert wait_until(lambda: not server._requests_in_flight())
    assert server.errors == []


def test_the_server_ends_with_close_notify(tls_cert: SelfSignedCert) -> None:
    """Like Twisted, and unlike a bare ssl.SSLSocket, the end of a request is a
    TLS close_notify, not a truncation: strict clients see a clean end."""
    with (
        txsocketserver.ThreadingTCPServer(tls_description(tls_cert), ByeHandler) as server,
        serve_in_thread(server),
    ):
        with tls_connect(
            server.server_address, tls_cert.cert_path, suppress_ragged_eofs=False
        ) as client:
            assert client.recv(64) == b"bye\n"
            assert client.recv(64) == b""  # SSLEOFError here without close_notify


def test_a_client_that_does_not_speak_tls_is_logged_with_the_reason(
    tls_cert: SelfSignedCert, events: list[dict[str, Any]]
) -> None:
    # The stdlib idiom says nothing at all (get_request's SSLError is an
    # OSError, which the serving loop drops); ours logs the reason, and a
    # failed handshake is the client's doing, not a handler error.
    with tls_server(txsocketserver, tls_cert, EchoHandler) as server, serve_in_thread(server):
        with connect(server.server_address) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert plain.recv(64) == b""
        assert wait_until(
            lambda: any("TLS handshake" in e.get("log_format", "") for e in events),
            timeout=WAIT,
        )
        failed = [e for e in events if "TLS handshake" in e.get("log_format", "")]
        assert failed[0]["reason"] in ("HTTP_REQUEST", "WRONG_VERSION_NUMBER")
        assert server.errors == []
        with tls_connect(server.server_address, tls_cert.cert_path) as client:
            client.sendall(b"still serving\n")
            assert client.recv(64) == b"still serving\n"


def test_flow_control_bounds_memory_for_a_slow_reader(tls_cert: SelfSignedCert) -> None:
    size = 100 * 1024 * 1024
    with (
        txsocketserver.ThreadingTCPServer(tls_description(tls_cert), FirehoseHandler) as server,
        serve_in_thread(server),
    ):
        server.written = 0
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.settimeout(WAIT)
        raw.connect(server.server_address)
        context = client_context(tls_cert.cert_path)
        with context.wrap_socket(raw, server_hostname=LOCALHOST) as client:
            client.sendall(b"%d\n" % size)
            # Only the kernel's socket buffers on both sides hold anything.
            assert stalled_firehose(server) < 16 * 1024 * 1024
            assert receive_firehose_digest(client, size) == firehose_digest(size)


# --- the ssl: options -------------------------------------------------------------


def make_chain(directory: Path) -> tuple[Path, Path, Path, Path]:
    """A CA, an intermediate it signs, and a leaf for localhost the
    intermediate signs: (ca.pem, intermediate.pem, leaf.pem, leaf.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer is not None else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
            )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, intermediate_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    ca = issue("test CA", ca_key, None, ca_key, True)
    intermediate = issue("test intermediate", intermediate_key, ca, ca_key, True)
    leaf = issue("localhost", leaf_key, intermediate, intermediate_key, False)
    paths = [directory / name for name in ("ca.pem", "intermediate.pem", "leaf.pem", "leaf.key")]
    for path, cert in zip(paths, (ca, intermediate, leaf), strict=False):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[3].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths[0], paths[1], paths[2], paths[3]


def test_extra_cert_chain_is_sent(tmp_path: Path) -> None:
    ca, intermediate, leaf, key = make_chain(tmp_path)
    leaf_only = SelfSignedCert(cert_path=str(leaf), key_path=str(key))
    description = tls_description(leaf_only).replace(
        f"interface={LOCALHOST}", "interface=127.0.0.1"
    )
    chained = tls_description(leaf_only, extraCertChain=str(intermediate))
    # Without the intermediate the client (trusting the CA alone) must refuse.
    for described, verifies in ((description, False), (chained, True)):
        with (
            txsocketserver.ThreadingTCPServer(described, EchoHandler) as server,
            serve_in_thread(server),
        ):
            raw = connect(server.server_address)
            context = client_context(str(ca))
            try:
                with context.wrap_socket(raw, server_hostname="localhost") as client:
                    client.sendall(b"chained\n")
                    assert client.recv(64) == b"chained\n"
                assert verifies
            except ssl.SSLCertVerificationError:
                assert not verifies
            finally:
                raw.close()


def test_sslmethod_pins_the_tls_version(tls_cert: SelfSignedCert) -> None:
    pinned = tls_description(tls_cert, sslmethod="TLSv1_2_METHOD")
    with txsocketserver.ThreadingTCPServer(pinned, KindHandler) as server, serve_in_thread(server):
        with tls_connect(server.server_address, tls_cert.cert_path) as client:
            assert client.version() == "TLSv1.2"
            with client.makefile("rb") as lines:
                assert lines.readline() == b"SSLSocket TLSv1.2\n"


def test_bad_tls_files_fail_at_construction(tls_cert: SelfSignedCert, tmp_path: Path) -> None:
    fds = fd_count()
    with pytest.raises(ValueError, match="bad endpoint description"):
        txsocketserver.TCPServer(
            tls_description(SelfSignedCert(tls_cert.cert_path, str(tmp_path / "nope.pem"))),
            EchoHandler,
        )
    with pytest.raises(ValueError, match="dhParameters=.*No such file"):
        txsocketserver.TCPServer(
            tls_description(tls_cert, dhParameters=str(tmp_path / "no-dh.pem")), EchoHandler
        )
    assert fd_count() == fds


def test_an_ssl4_endpoint_object_goes_through_twisted_tls(tls_cert: SelfSignedCert) -> None:
    """An endpoint object carries a Twisted TLS configuration of any kind
    (client certificates, SNI...): Twisted does that TLS."""
    from txsocketserver._twisted import reactor as _reactor

    pem = Path(tls_cert.key_path).read_bytes() + Path(tls_cert.cert_path).read_bytes()
    options = PrivateCertificate.loadPEM(pem).options()
    endpoint = SSL4ServerEndpoint(_reactor.get_reactor(), 0, options, interface=LOCALHOST)

    class Recorder(txsocketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.server.request_type = type(self.request)
            self.wfile.write(self.rfile.readline())

    with (
        txsocketserver.ThreadingTCPServer(txsocketserver.Endpoint(endpoint), Recorder) as server,
        serve_in_thread(server),
    ):
        assert server.socket is None
        with tls_connect(server.server_address, tls_cert.cert_path) as client:
            client.sendall(b"via twisted\n")
            assert client.recv(64) == b"via twisted\n"
        assert server.request_type is TransportSocket


def test_forking_servers_serve_tls_in_the_child(tls_cert: SelfSignedCert) -> None:
    # The child does the handshake (tests/test_forking_tls.py has the rest).
    with (
        txsocketserver.ForkingTCPServer(tls_description(tls_cert), EchoHandler) as server,
        serve_in_thread(server),
    ):
        with tls_connect(server.server_address, tls_cert.cert_path) as client:
            client.sendall(b"fork me\n")
            assert client.recv(64) == b"fork me\n"


# --- nothing leaks ----------------------------------------------------------------


def test_tls_servers_leave_nothing_behind(tls_cert: SelfSignedCert) -> None:
    warm_up(txsocketserver)
    fds, threads = fd_count(), thread_count()
    for _ in range(3):
        with tls_server(txsocketserver, tls_cert, EchoHandler) as server, serve_in_thread(server):
            with tls_connect(server.server_address, tls_cert.cert_path) as client:
                client.sendall(b"x\n")
                assert client.recv(64) == b"x\n"
            # A client that vanishes mid-handshake, one that is not TLS, one
            # that leaves without a word.
            with connect(server.server_address) as half:
                half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                reset_close(half)
            with connect(server.server_address) as plain:
                plain.sendall(b"hello?\n")
            connect(server.server_address).close()
            assert wait_until(lambda: not server._requests_in_flight())
    threading.Event().wait(0.1)
    settle_resources(fds, threads)


def test_ssl_endpoint_without_the_tls_extra_says_to_install_it(tls_cert: SelfSignedCert) -> None:
    # Ours only: the stdlib has no endpoints.  A fresh interpreter in which
    # pyOpenSSL cannot be imported (None in sys.modules makes the import fail,
    # as an absent package does) stands for an install without the tls extra.
    description = (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(tls_cert.key_path)}"
        f":certKey={quoteStringArgument(tls_cert.cert_path)}"
    )
    program = (
        "import sys\n"
        "sys.modules['OpenSSL'] = None\n"
        "import txsocketserver\n"
        "try:\n"
        f"    txsocketserver.TCPServer({description!r}, txsocketserver.BaseRequestHandler)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=WAIT * 4
    )
    assert result.returncode == 0, result.stderr
    assert "needs TLS support (OpenSSL is not installed)" in result.stdout
    assert "pip install 'txsocketserver[tls]'" in result.stdout
