"""TLS on forking servers (``ssl:`` with ``ForkingMixIn``), in both fork modes:
the child does the handshake (``_forking/tls.py``), with the listener's policy
(client certificates, ALPN, versions, ``handshakeTimeout``), and a certificate
reload reaches the children forked after it.  Real peers: Python's ``ssl``,
``curl --cert``, ``openssl s_client -cert``, and ``python -m txsocketserver
--mode forking`` reloaded with SIGHUP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from support import LOCALHOST, WAIT, connect, serve_in_thread, wait_until
from tls_pki import Issued, make_authority, private_pem, write_pem

CURL = shutil.which("curl")
OPENSSL = shutil.which("openssl")
WAIT_FORK = 3 * WAIT
SRC = str(Path(__file__).resolve().parents[1] / "src")


class PeerHandler(txsocketserver.StreamRequestHandler):
    """Answers one HTTP request (or a line) with what it sees of its TLS peer."""

    def handle(self) -> None:
        self.rfile.readline()
        der = self.request.getpeercert(binary_form=True)
        facts = {
            "type": type(self.request).__name__,
            "pid": os.getpid(),
            "cert": self.request.getpeercert(),
            "der": None if der is None else hashlib.sha256(der).hexdigest(),
            "version": self.request.version(),
            "alpn": self.request.selected_alpn_protocol(),
            "cipher": self.request.cipher()[0],
        }
        body = json.dumps(facts).encode()
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class TemplateServer(txsocketserver.ForkingTCPServer):
    fork_from = "template"


class ServerForkServer(txsocketserver.ForkingTCPServer):
    fork_from = "server"


SERVERS = {"template": TemplateServer, "server": ServerForkServer}


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


def description(server: Issued, port: int = 0, **options: str) -> str:
    extra = "".join(f":{k}={quoteStringArgument(v)}" for k, v in options.items())
    return (
        f"ssl:{port}:interface={LOCALHOST}:privateKey={quoteStringArgument(server.key_path)}"
        f":certKey={quoteStringArgument(server.cert_path)}{extra}"
    )


def client_context(pki: PKI, client: Issued | None, **kw: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    if client is not None:
        context.load_cert_chain(client.cert_path, client.key_path)
    if "alpn" in kw:
        context.set_alpn_protocols(kw["alpn"])
    return context


def ask(address: Any, context: ssl.SSLContext) -> dict[str, Any]:
    """One request over TLS; the handler's JSON answer."""
    with connect(address, timeout=WAIT_FORK) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
    return json.loads(reply.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]


def refused(address: Any, context: ssl.SSLContext) -> None:
    """The handshake (or, TLS 1.3, the first read after it) fails; no handler answers."""
    with connect(address, timeout=WAIT_FORK) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw, server_hostname="localhost") as client:
                client.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert client.recv(65536) == b"", "a handler answered"
                raise ConnectionResetError("closed without an answer")


class Outcomes:
    """A lifecycle observer: each record's outcome, as it ends."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def accepted(self, record: Any) -> None:
        pass

    def refused(self, record: Any) -> None:
        pass

    def started(self, record: Any) -> None:
        pass

    def ended(self, record: Any) -> None:
        self.outcomes.append(record.outcome)


@pytest.fixture(params=list(SERVERS))
def fork_from(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_the_child_sees_the_verified_client_certificate(fork_from: str, pki: PKI) -> None:
    address = description(pki.server, clientCA=pki.ca.cert_path, alpn="h2,http/1.1")
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        facts = ask(server.server_address, client_context(pki, pki.client, alpn=["http/1.1"]))
        assert facts["pid"] != os.getpid()
        assert facts["type"] == "SSLSocket"
        assert facts["der"] == hashlib.sha256(pki.client.der).hexdigest()
        subject = dict(pair[0] for pair in facts["cert"]["subject"])
        assert subject["commonName"] == "billing"
        assert int(facts["cert"]["serialNumber"], 16) == pki.client.serial
        assert facts["version"] == "TLSv1.3"
        assert facts["alpn"] == "http/1.1"


@pytest.mark.parametrize("who", ["nobody", "stranger", "expired"])
def test_a_failed_handshake_in_the_child_is_logged_counted_and_survived(
    fork_from: str, who: str, pki: PKI, capfd: pytest.CaptureFixture[str]
) -> None:
    client = {"nobody": None, "stranger": pki.stranger, "expired": pki.expired}[who]
    outcomes = Outcomes()
    address = description(pki.server, clientCA=pki.ca.cert_path)
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        server.add_observer(outcomes)
        refused(server.server_address, client_context(pki, client))
        assert wait_until(lambda: "refused:tls_handshake" in outcomes.outcomes, WAIT_FORK)
        # The server goes on serving good clients.
        assert ask(server.server_address, client_context(pki, pki.client))["der"] is not None
        assert wait_until(lambda: len(outcomes.outcomes) == 2, WAIT_FORK)
    assert outcomes.outcomes == ["refused:tls_handshake", "ok"]
    expected = {
        "nobody": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "stranger": "CERTIFICATE_VERIFY_FAILED",
        "expired": "CERTIFICATE_VERIFY_FAILED",
    }[who]
    err = capfd.readouterr().err
    line = next(line for line in err.splitlines() if "TLS handshake with" in line)
    assert expected in line.upper().replace(" ", "_"), err
    assert "Traceback" not in err


def test_the_childs_policy_is_the_listeners(fork_from: str, pki: PKI) -> None:
    """minVersion, handshakeTimeout: a TLS 1.2 client is refused, a silent
    one is closed at the deadline, each counted."""
    outcomes = Outcomes()
    address = description(pki.server, minVersion="TLSv1.3", handshakeTimeout="0.5")
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        server.add_observer(outcomes)
        old = client_context(pki, None)
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        refused(server.server_address, old)
        with connect(server.server_address, timeout=WAIT_FORK) as silent:
            # Closed by the child at the deadline, without a byte.
            assert silent.recv(1) == b""
        assert ask(server.server_address, client_context(pki, None))["version"] == "TLSv1.3"
        assert wait_until(lambda: len(outcomes.outcomes) == 3, WAIT_FORK)
    assert outcomes.outcomes == ["refused:tls_handshake", "refused:tls_handshake", "ok"]


def test_the_childs_ciphers_and_version_range_are_the_listeners(fork_from: str, pki: PKI) -> None:
    cipher = "ECDHE-ECDSA-AES128-GCM-SHA256"
    address = description(pki.server, maxVersion="TLSv1.2", ciphers=cipher)
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        facts = ask(server.server_address, client_context(pki, None))
        assert (facts["version"], facts["cipher"]) == ("TLSv1.2", cipher)
        other = client_context(pki, None)
        other.set_ciphers("ECDHE-ECDSA-AES256-GCM-SHA384")
        other.maximum_version = ssl.TLSVersion.TLSv1_2
        refused(server.server_address, other)


@pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")
def test_curl_with_and_without_a_client_certificate(fork_from: str, pki: PKI) -> None:
    assert CURL is not None
    address = description(pki.server, clientCA=pki.ca.cert_path)
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        port = server.server_address[1]
        url = f"https://localhost:{port}/"
        common = [CURL, "-sS", "--max-time", str(WAIT_FORK), "--cacert", pki.ca.cert_path]
        common += ["--resolve", f"localhost:{port}:{LOCALHOST}"]
        good = subprocess.run(
            [*common, "--cert", pki.client.cert_path, "--key", pki.client.key_path, url],
            capture_output=True,
            timeout=2 * WAIT_FORK,
        )
        assert good.returncode == 0, good.stderr
        assert json.loads(good.stdout)["der"] == hashlib.sha256(pki.client.der).hexdigest()
        bad = subprocess.run([*common, url], capture_output=True, timeout=2 * WAIT_FORK)
        assert bad.returncode != 0
        assert b"billing" not in bad.stdout


def s_client(port: int, pki: PKI, *extra: str, data: bytes = b"GET / HTTP/1.0\r\n") -> bytes:
    assert OPENSSL is not None
    run = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{LOCALHOST}:{port}", "-CAfile", pki.ca.cert_path,
         *extra],
        input=data,
        capture_output=True,
        timeout=2 * WAIT_FORK,
    )  # fmt: skip
    return run.stdout


def served_serial(port: int, pki: PKI) -> int:
    """The serial number of the certificate served on *port* (openssl s_client)."""
    assert OPENSSL is not None
    out = s_client(port, pki, "-cert", pki.client.cert_path, "-key", pki.client.key_path, data=b"")
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", out, re.S)
    assert pem is not None, out
    text = subprocess.run(
        [OPENSSL, "x509", "-noout", "-serial"], input=pem.group(0), capture_output=True, check=True
    ).stdout
    return int(text.decode().strip().partition("=")[2], 16)


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_openssl_s_client_with_a_certificate(fork_from: str, pki: PKI) -> None:
    address = description(pki.server, clientCA=pki.ca.cert_path)
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        out = s_client(
            server.server_address[1], pki, "-cert", pki.client.cert_path,
            "-key", pki.client.key_path, "-quiet", "-verify_return_error",
        )  # fmt: skip
        facts = json.loads(out.partition(b"\r\n\r\n")[2])
        assert facts["der"] == hashlib.sha256(pki.client.der).hexdigest()


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
def test_a_reload_reaches_the_children_and_a_bad_file_keeps_the_old(
    fork_from: str, pki: PKI, tmp_path: Path
) -> None:
    first = pki.ca.issue(str(tmp_path), "localhost", serial=1001, prefix="site")
    address = description(first, clientCA=pki.ca.cert_path)
    with SERVERS[fork_from](address, PeerHandler) as server, serve_in_thread(server):
        port = server.server_address[1]
        assert served_serial(port, pki) == 1001
        pki.ca.issue(str(tmp_path), "localhost", serial=1002, prefix="site")
        assert served_serial(port, pki) == 1001  # nothing changes before the reload
        assert txsocketserver.reload_certificates(server) == [(address, None)]
        assert served_serial(port, pki) == 1002
        assert ask(server.server_address, client_context(pki, pki.client))["der"] is not None
        # A key that does not match the certificate: the reload fails, the
        # children keep the certificate in use.
        write_pem(first.key_path, private_pem(_new_key()))
        (outcome,) = txsocketserver.reload_certificates(server)
        assert outcome[1] is not None
        assert served_serial(port, pki) == 1002
        assert ask(server.server_address, client_context(pki, pki.client))["der"] is not None


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


# -- python -m txsocketserver --mode forking -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def cli_server(pki: PKI, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Issued]]:
    site = pki.ca.issue(str(tmp_path), "localhost", serial=2001, prefix="site")
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "txsocketserver", "--mode", "forking",
         "--handler", "test_forking_tls:PeerHandler",
         "--listen", description(site, port, clientCA=pki.ca.cert_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(Path(__file__).parent)])},
    )  # fmt: skip
    try:
        assert wait_until(lambda: _listening(port) or process.poll() is not None, WAIT_FORK)
        assert process.poll() is None
        yield process, port, site
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(WAIT_FORK)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(WAIT_FORK)
        assert process.stdout is not None
        process.stdout.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection((LOCALHOST, port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(OPENSSL is None or CURL is None, reason="openssl and curl are needed")
def test_the_cli_forks_tls_and_reloads_on_sighup(
    cli_server: tuple[subprocess.Popen[bytes], int, Issued], pki: PKI, tmp_path: Path
) -> None:
    assert CURL is not None
    process, port, site = cli_server
    curl = [CURL, "-sS", "--max-time", str(WAIT_FORK), "--cacert", pki.ca.cert_path,
            "--resolve", f"localhost:{port}:{LOCALHOST}",
            f"https://localhost:{port}/"]  # fmt: skip
    good = subprocess.run(
        [*curl, "--cert", pki.client.cert_path, "--key", pki.client.key_path],
        capture_output=True,
        timeout=2 * WAIT_FORK,
    )
    assert good.returncode == 0, good.stderr
    facts = json.loads(good.stdout)
    assert facts["der"] == hashlib.sha256(pki.client.der).hexdigest()
    assert facts["pid"] != process.pid
    assert subprocess.run(curl, capture_output=True, timeout=2 * WAIT_FORK).returncode != 0
    assert served_serial(port, pki) == 2001
    pki.ca.issue(str(tmp_path), "localhost", serial=2002, prefix="site")
    process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: served_serial(port, pki) == 2002, WAIT_FORK)
    # A bad file on the next reload: the old certificate stays.
    write_pem(site.cert_path, b"not a certificate\n")
    process.send_signal(signal.SIGHUP)
    for _ in range(3):
        assert served_serial(port, pki) == 2002
    assert process.poll() is None


def test_the_exit_status_of_a_refused_handshake_is_named_once() -> None:
    # The core names it without importing the ssl module: the two must agree.
    from txsocketserver._core import forking_mixin
    from txsocketserver._forking import tls

    assert forking_mixin.EXIT_TLS_HANDSHAKE == tls.EXIT_TLS_HANDSHAKE != 1
