"""Certificate reload without dropping anything: ``reload_certificates()``,
SIGHUP to ``python -m txsocketserver`` and ``twistd socketserver``, and the
``--workers`` reload.  ``openssl s_client`` reads the served certificate's
serial before and after, while a connection opened before the reload goes
on working; bad new files are logged and the old certificate stays.
"""

from __future__ import annotations

import re
import shutil
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import quoteStringArgument

import txsocketserver
from async_handlers import AsyncEcho
from support import LOCALHOST, WAIT, connect, recv_line, serve_in_thread, wait_until
from test_twistd_cli import CLI, TWISTD, Spawn, spawn  # noqa: F401
from test_workers import START, wait_for_workers
from tls_pki import Authority, Issued, make_authority, write_pem
from twisted_world_handlers import EchoHandler

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


class Site:
    """A CA, and the certificate files a server serves (renewed in place)."""

    def __init__(self, directory: Path) -> None:
        self.dir = str(directory)
        self.ca: Authority = make_authority(self.dir, "site")
        self.current: Issued = self.renew()

    def renew(self) -> Issued:
        """Issue a new certificate over the served files, as certbot would."""
        self.current = self.ca.issue(self.dir, "localhost", prefix="served")
        return self.current

    @property
    def description(self) -> str:
        return (
            f"ssl:0:interface={LOCALHOST}"
            f":privateKey={quoteStringArgument(self.current.key_path)}"
            f":certKey={quoteStringArgument(self.current.cert_path)}"
        )

    def client(self, address: Any) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=self.ca.cert_path)
        raw = connect(address)
        return context.wrap_socket(raw, server_hostname="localhost")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def served_serial(address: Any) -> int:
    """The serial of the certificate served at *address*, as ``openssl s_client`` reads it."""
    assert OPENSSL is not None
    hello = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{address[0]}:{address[1]}"],
        input=b"",
        capture_output=True,
        timeout=2 * WAIT,
    )
    pem = re.search(
        rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", hello.stdout, re.S
    )
    assert pem, hello.stdout + hello.stderr
    serial = subprocess.run(
        [OPENSSL, "x509", "-noout", "-serial"],
        input=pem.group(0),
        capture_output=True,
        check=True,
        timeout=WAIT,
    )
    return int(serial.stdout.decode().strip().partition("=")[2], 16)


def echo(client: ssl.SSLSocket, line: bytes) -> bytes:
    client.sendall(line)
    return recv_line(client)


@pytest.mark.parametrize("kind", ["threading", "async"])
def test_reload_certificates_swaps_the_certificate_for_new_handshakes_only(
    site: Site, kind: str, events: list[dict[str, Any]]
) -> None:
    server_class = (
        txsocketserver.TCPServer if kind == "async" else txsocketserver.ThreadingTCPServer
    )
    handler = AsyncEcho if kind == "async" else EchoHandler
    with server_class(site.description, handler) as server, serve_in_thread(server):
        server.daemon_threads = True  # type: ignore[attr-defined]
        address = server.server_address
        first = site.current.serial
        assert served_serial(address) == first
        with site.client(address) as earlier:
            assert echo(earlier, b"before\n") == b"before\n"
            renewed = site.renew().serial
            assert served_serial(address) == first, "reloaded without being asked"
            assert txsocketserver.reload_certificates(server) == [(site.description, None)]
            assert served_serial(address) == renewed
            # The connection made before the reload goes on, on its old session.
            assert echo(earlier, b"after\n") == b"after\n"
            assert int(earlier.getpeercert()["serialNumber"], 16) == first
            # A bad new file: logged, and the renewed certificate stays.
            Path(site.current.key_path).write_text("garbage\n")
            [(description, error)] = txsocketserver.reload_certificates(server)
            assert error is not None and "privateKey=" in error
            assert served_serial(address) == renewed
            assert echo(earlier, b"still\n") == b"still\n"
    assert any("certificate reload failed" in e.get("log_format", "") for e in events)


def test_a_key_that_does_not_match_is_refused(site: Site, tmp_path: Path) -> None:
    with txsocketserver.ThreadingTCPServer(site.description, EchoHandler) as server:
        served = site.current
        other = site.ca.issue(str(tmp_path), "other")
        write_pem(served.key_path, Path(other.key_path).read_bytes())
        [(_, error)] = txsocketserver.reload_certificates(server)
        assert error is not None and "KEY_VALUES_MISMATCH" in error.upper().replace(" ", "_")
        missing = Path(served.cert_path)
        missing.unlink()
        [(_, error)] = txsocketserver.reload_certificates(server)
        assert error is not None and "No such file" in error


def test_reload_without_a_server_reloads_every_listener(site: Site) -> None:
    with (
        txsocketserver.ThreadingTCPServer(site.description, EchoHandler) as one,
        txsocketserver.ThreadingTCPServer(site.description, EchoHandler) as two,
    ):
        reloaded = {description for description, error in txsocketserver.reload_certificates()}
        assert site.description in reloaded
        assert (
            len([d for d, _ in txsocketserver.reload_certificates() if d == site.description]) >= 2
        )
        del one, two


@pytest.fixture
def processes(spawn: Spawn) -> Spawn:  # noqa: F811 - the fixture imported above
    return spawn


@pytest.mark.parametrize("front_end", ["cli", "twistd"])
def test_sighup_reloads_the_certificate(processes: Spawn, site: Site, front_end: str) -> None:
    handler = ["--listen", site.description, "--handler", "twisted_world_handlers:EchoHandler"]
    if front_end == "cli":
        server = processes(*CLI, "--mode", "threading", *handler)
    else:
        server = processes(
            *TWISTD, "-n", "--pidfile=", "--logfile=-", "socketserver", "--mode", "threading",
            *handler,
        )  # fmt: skip
    address = server.address()
    first = site.current.serial
    assert served_serial(address) == first
    with site.client(address) as earlier:
        assert echo(earlier, b"before\n") == b"before\n"
        renewed = site.renew().serial
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(re.compile("certificate reloaded"), timeout=WAIT)
        assert served_serial(address) == renewed
        assert echo(earlier, b"after\n") == b"after\n"
        Path(site.current.cert_path).write_text("garbage\n")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(re.compile("certificate reload failed"), timeout=WAIT)
        assert served_serial(address) == renewed
        assert echo(earlier, b"still\n") == b"still\n"
    assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.output()


def test_workers_reload_picks_up_the_new_certificate(processes: Spawn, site: Site) -> None:
    server = processes(
        *CLI, "--workers", "1", "--mode", "threading", "--listen", site.description,
        "--handler", "twisted_world_handlers:EchoHandler",
    )  # fmt: skip
    address = server.address()
    wait_for_workers(server, 1, generation=0, timeout=START)
    first = site.current.serial
    assert served_serial(address) == first
    with site.client(address) as earlier:
        assert echo(earlier, b"before\n") == b"before\n"
        Path(site.current.key_path).write_text("garbage\n")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(re.compile("not reloading, the certificates are bad"), timeout=WAIT)
        assert served_serial(address) == first
        renewed = site.renew().serial
        server.process.send_signal(signal.SIGHUP)
        wait_for_workers(server, 1, generation=1, timeout=START)
        assert wait_until(lambda: served_serial(address) == renewed, 2 * WAIT)
        # The old worker drains: the connection it holds is served to its end.
        assert echo(earlier, b"after\n") == b"after\n"
    assert server.stop() in (0, -signal.SIGTERM)
