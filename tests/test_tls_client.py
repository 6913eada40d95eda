"""Client certificates on ``ssl:`` (``clientCA=``, ``verifyClient=``), checked
with ``curl --cert`` and ``openssl s_client -cert``: the handler sees the
verified certificate as an ``ssl.SSLSocket`` shows it, whether the server
accepts the connection itself (synchronous, threading: a real SSLSocket) or
Twisted carries it (async handlers: the same answers read off the transport).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from support import LOCALHOST, WAIT, connect, fd_count, serve_in_thread, wait_until
from tls_pki import Issued, make_authority

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")


def peer_facts(request: Any) -> dict[str, Any]:
    """What a handler can tell of its TLS peer, as JSON-able values."""
    certificate = request.getpeercert()
    der = request.getpeercert(binary_form=True)
    return {
        "type": type(request).__name__,
        "cert": certificate,
        "der": None if der is None else hashlib.sha256(der).hexdigest(),
        "version": request.version(),
        "alpn": request.selected_alpn_protocol(),
    }


class PeerHandler(txsocketserver.StreamRequestHandler):
    """Answers one HTTP request (or a line) with the peer's certificate facts."""

    def handle(self) -> None:
        self.rfile.readline()
        body = json.dumps(peer_facts(self.request)).encode()
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class AsyncPeerHandler(txsocketserver.AsyncStreamRequestHandler):
    async def handle(self) -> None:
        await self.rfile.readline()
        body = json.dumps(peer_facts(self.request)).encode()
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


KINDS = {
    "sync": (txsocketserver.TCPServer, PeerHandler),
    "threading": (txsocketserver.ThreadingTCPServer, PeerHandler),
    "async": (txsocketserver.TCPServer, AsyncPeerHandler),
}


class PKI:
    def __init__(self, directory: Path) -> None:
        self.dir = str(directory)
        self.ca = make_authority(self.dir, "services")
        self.other_ca = make_authority(self.dir, "elsewhere")
        self.server = self.ca.issue(self.dir, "localhost")
        self.client = self.ca.issue(self.dir, "billing", client=True)
        self.stranger = self.other_ca.issue(self.dir, "stranger", client=True)
        self.expired = self.ca.issue(self.dir, "old", client=True, expired=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


def description(server: Issued, **options: str) -> str:
    extra = "".join(f":{k}={quoteStringArgument(v)}" for k, v in options.items())
    return (
        f"ssl:0:interface={LOCALHOST}:privateKey={quoteStringArgument(server.key_path)}"
        f":certKey={quoteStringArgument(server.cert_path)}{extra}"
    )


def serving(kind: str, address: str) -> Any:
    server_class, handler = KINDS[kind]

    class Server(server_class):  # type: ignore[misc,valid-type]
        daemon_threads = True

    return Server(address, handler)


def client_context(pki: PKI, client: Issued | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    if client is not None:
        context.load_cert_chain(client.cert_path, client.key_path)
    return context


def ask(server: Any, context: ssl.SSLContext) -> dict[str, Any]:
    """One request over TLS; the handler's JSON answer."""
    with connect(server.server_address) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
    return json.loads(reply.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def refused(server: Any, context: ssl.SSLContext) -> None:
    """The handshake (or the first read after it: TLS 1.3 sends the
    verdict on the client certificate after the client thinks it is done)
    fails; no handler answers."""
    with connect(server.server_address) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as client:
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert client.recv(65536) == b"", "a handler answered"
                raise ConnectionResetError("closed without an answer")


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A server of the kind and ``ssl:`` description the test asks for
    (``indirect`` parametrisation: (kind, description))."""
    kind, address = request.param
    with serving(kind, address) as server, serve_in_thread(server):
        yield server


@pytest.mark.parametrize("kind", KINDS)
def test_the_handler_sees_the_verified_client_certificate(kind: str, pki: PKI) -> None:
    with (
        serving(kind, description(pki.server, clientCA=pki.ca.cert_path)) as server,
        serve_in_thread(server),
    ):
        facts = ask(server, client_context(pki, pki.client))
        assert facts["der"] == hashlib.sha256(pki.client.der).hexdigest()
        subject = dict(pair[0] for pair in facts["cert"]["subject"])
        assert subject["commonName"] == "billing"
        assert int(facts["cert"]["serialNumber"], 16) == pki.client.serial
        assert facts["version"] == "TLSv1.3"


def test_twisted_carried_and_own_socket_certificates_read_the_same(pki: PKI) -> None:
    """Async handlers read the certificate off Twisted's transport; it must
    be what ``ssl.SSLSocket.getpeercert()`` gives a synchronous handler."""
    answers = []
    for kind in ("sync", "async"):
        with (
            serving(kind, description(pki.server, clientCA=pki.ca.cert_path)) as server,
            serve_in_thread(server),
        ):
            answers.append(ask(server, client_context(pki, pki.client)))
    assert answers[0]["type"] == "SSLSocket"
    assert answers[1]["type"] == "AsyncSocket"
    assert answers[0]["cert"] == answers[1]["cert"]
    assert answers[0]["der"] == answers[1]["der"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("who", ["nobody", "stranger", "expired"])
def test_a_client_without_a_good_certificate_is_refused_and_logged(
    kind: str, who: str, pki: PKI, events: list[dict[str, Any]]
) -> None:
    client = {"nobody": None, "stranger": pki.stranger, "expired": pki.expired}[who]
    with (
        serving(kind, description(pki.server, clientCA=pki.ca.cert_path)) as server,
        serve_in_thread(server),
    ):
        refused(server, client_context(pki, client))
        assert wait_until(
            lambda: any("TLS handshake" in e.get("log_format", "") for e in events), WAIT
        )
        reason = next(e["reason"] for e in events if "TLS handshake" in e.get("log_format", ""))
        expected = {
            "nobody": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
            "stranger": "CERTIFICATE_VERIFY_FAILED",
            "expired": "CERTIFICATE_VERIFY_FAILED",
        }[who]
        assert expected in reason.upper().replace(" ", "_")
        # And the server goes on serving good clients.
        assert ask(server, client_context(pki, pki.client))["der"] is not None


@pytest.mark.parametrize("kind", KINDS)
def test_verify_client_optional_serves_clients_without_a_certificate(kind: str, pki: PKI) -> None:
    address = description(pki.server, clientCA=pki.ca.cert_path, verifyClient="optional")
    with serving(kind, address) as server, serve_in_thread(server):
        anonymous = ask(server, client_context(pki, None))
        assert anonymous["cert"] is None and anonymous["der"] is None
        named = ask(server, client_context(pki, pki.client))
        assert named["der"] == hashlib.sha256(pki.client.der).hexdigest()
        refused(server, client_context(pki, pki.stranger))


@pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")
@pytest.mark.parametrize("kind", KINDS)
def test_curl_with_and_without_a_client_certificate(kind: str, pki: PKI) -> None:
    assert CURL is not None
    with (
        serving(kind, description(pki.server, clientCA=pki.ca.cert_path)) as server,
        serve_in_thread(server),
    ):
        url = f"https://localhost:{server.server_address[1]}/"
        common = [CURL, "-sS", "--max-time", str(WAIT), "--cacert", pki.ca.cert_path]
        common += ["--resolve", f"localhost:{server.server_address[1]}:{LOCALHOST}"]
        good = subprocess.run(
            [*common, "--cert", pki.client.cert_path, "--key", pki.client.key_path, url],
            capture_output=True,
            timeout=2 * WAIT,
        )
        assert good.returncode == 0, good.stderr
        facts = json.loads(good.stdout)
        assert facts["der"] == hashlib.sha256(pki.client.der).hexdigest()
        bad = subprocess.run([*common, url], capture_output=True, timeout=2 * WAIT)
        assert bad.returncode != 0
        assert b"billing" not in bad.stdout


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
@pytest.mark.parametrize("kind", KINDS)
def test_openssl_s_client_with_a_certificate(kind: str, pki: PKI) -> None:
    assert OPENSSL is not None
    with (
        serving(kind, description(pki.server, clientCA=pki.ca.cert_path)) as server,
        serve_in_thread(server),
    ):
        run = subprocess.run(
            [
                OPENSSL, "s_client", "-connect", f"{LOCALHOST}:{server.server_address[1]}",
                "-CAfile", pki.ca.cert_path, "-cert", pki.client.cert_path,
                "-key", pki.client.key_path, "-quiet", "-verify_return_error",
            ],
            input=b"GET / HTTP/1.0\r\n",
            capture_output=True,
            timeout=2 * WAIT,
        )  # fmt: skip
        body = run.stdout.partition(b"\r\n\r\n")[2]
        assert json.loads(body)["der"] == hashlib.sha256(pki.client.der).hexdigest()


def test_wrong_ca_file_is_an_error_at_construction(pki: PKI, tmp_path: Path) -> None:
    fds = fd_count()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    for path, why in ((str(tmp_path / "none.pem"), "No such file"), (str(garbage), "")):
        with pytest.raises(ValueError, match=f"clientCA=.*{why}"):
            txsocketserver.TCPServer(description(pki.server, clientCA=path), PeerHandler)
    assert fd_count() == fds
