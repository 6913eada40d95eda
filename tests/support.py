"""Helpers shared by the differential test suites (stream, datagram, forking).

Everything here works the same against ``socketserver`` and ``txsocketserver``:
the helpers only use the public ``socketserver`` API and plain sockets.  Every
blocking wait is bounded, so a hung server fails a test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: Default bound for anything that waits on the server under test.
WAIT = 5.0

LOCALHOST = "127.0.0.1"
ANY_PORT = (LOCALHOST, 0)


def fd_count() -> int:
    """Number of file descriptors open in this process."""
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    """Number of live Python threads, the calling one included."""
    return threading.active_count()


def wait_until(
    predicate: Callable[[], Any], timeout: float = WAIT, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass.

    Returns the last truth value, so callers write ``assert wait_until(...)``.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def settle_resources(baseline_fds: int, baseline_threads: int, timeout: float = WAIT) -> None:
    """Assert that fds and threads come back to a baseline (after a grace period)."""

    def settled() -> bool:
        gc.collect()
        return fd_count() <= baseline_fds and thread_count() <= baseline_threads

    wait_until(settled, timeout, interval=0.05)
    assert fd_count() <= baseline_fds, (fd_count(), baseline_fds, os.listdir("/proc/self/fd"))
    assert thread_count() <= baseline_threads, (
        thread_count(),
        baseline_threads,
        [t.name for t in threading.enumerate()],
    )


@dataclass
class ThreadResult:
    """What a function run by :func:`run_in_thread` did."""

    thread: threading.Thread
    value: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def join(self, timeout: float = WAIT) -> ThreadResult:
        """Wait for the thread; fail the test if it is still running."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} still running after {timeout}s"
        return self


def run_in_thread(fn: Callable[..., Any], *args: Any, name: str | None = None) -> ThreadResult:
    """Run ``fn(*args)`` in a new daemon thread, capturing its result or exception.

    Any exception, ``SystemExit`` and ``KeyboardInterrupt`` included, is kept
    in ``.error`` instead of escaping the thread.
    """
    result = ThreadResult(thread=threading.Thread())

    def target() -> None:
        try:
            result.value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result.error = exc
        finally:
            result.done.set()

    result.thread = threading.Thread(target=target, name=name or f"run:{fn!r}", daemon=True)
    result.thread.start()
    return result


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout: float = WAIT) -> Any:
    """Call ``fn(*args)`` in a helper thread; fail if it does not return in time."""
    result = run_in_thread(fn, *args).join(timeout)
    if result.error is not None:
        raise result.error
    return result.value


@contextlib.contextmanager
def serve_in_thread(server: Any, poll_interval: float = 0.05) -> Iterator[ThreadResult]:
    """Run ``server.serve_forever(poll_interval)`` in a thread for the ``with`` body.

    On exit: ``shutdown()`` (bounded), join the thread (bounded), and re-raise
    anything ``serve_forever`` raised.  The server itself is not closed; nest
    this inside ``with server:``.
    """
    serving = run_in_thread(server.serve_forever, poll_interval, name="serve_forever")
    try:
        yield serving
    finally:
        if not serving.done.is_set():
            call_with_timeout(server.shutdown)
        serving.join()
    if serving.error is not None:
        raise serving.error


def connect(address: Any, family: int = socket.AF_INET, timeout: float = WAIT) -> socket.socket:
    """A client socket connected to ``address``, with a bounded timeout."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def connect_to(server: Any, timeout: float = WAIT) -> socket.socket:
    """A client socket connected to a stream ``server`` (TCP, TCP6 or Unix)."""
    return connect(server.server_address, server.address_family, timeout)


def recv_all(sock: socket.socket, limit: int = 1 << 26) -> bytes:
    """Read until EOF (bounded by the socket timeout and ``limit`` bytes)."""
    chunks = []
    size = 0
    while size < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def recv_line(sock: socket.socket) -> bytes:
    """Read one ``\\n``-terminated line byte by byte (no read-ahead)."""
    out = bytearray()
    while not out.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        out += byte
    return bytes(out)


def request_reply(server: Any, payload: bytes) -> bytes:
    """Connect, send ``payload``, half-close, and return everything received."""
    with connect_to(server) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return recv_all(sock)


def reset_close(sock: socket.socket) -> None:
    """Close ``sock`` so that the peer sees a TCP RST (SO_LINGER with 0 timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


@contextlib.contextmanager
def unix_socket_path() -> Iterator[str]:
    """A fresh, short (< 108 bytes) path for a Unix socket; removed afterwards."""
    directory = tempfile.mkdtemp(prefix="txss-", dir="/tmp")
    try:
        yield os.path.join(directory, "sock")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def ipv6_loopback_available() -> bool:
    """True if a socket can be bound to ``::1``."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class SelfSignedCert:
    """A PEM certificate and key for ``localhost`` / ``127.0.0.1``."""

    cert_path: str
    key_path: str


def make_self_signed_cert(directory: str) -> SelfSignedCert:
    """Write a fresh self-signed certificate for localhost into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return SelfSignedCert(cert_path, key_path)


def warm_up(module: Any) -> None:
    """Serve and close one sync and one threading server of ``module``.

    Run this before taking an fd/thread baseline: it starts whatever lives for
    the whole process (for txsocketserver, the background reactor thread and
    its thread pool), so that only per-server resources are measured.
    """

    class Echo(module.StreamRequestHandler):
        def handle(self) -> None:
            self.wfile.write(self.rfile.readline())

    for server_class in (module.TCPServer, module.ThreadingTCPServer):
        with server_class(ANY_PORT, Echo) as server, serve_in_thread(server):
            assert request_reply(server, b"warm\n") == b"warm\n"
    gc.collect()


def systemd_activation(fd: int, name: str = "app.socket") -> list[str]:
    """The argv prefix that runs ``python -m txsocketserver`` (followed by its own
    arguments) as systemd socket activation would: the socket *fd* as fd 3,
    ``LISTEN_FDS=1``, its name in ``LISTEN_FDNAMES`` (Twisted requires it, as
    systemd >= 227 sets it), ``LISTEN_PID`` the server's pid (an exec keeps the
    pid of the wrapper that sets it).  Pass ``pass_fds=(fd,)`` to the spawn."""
    wrapper = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.close(int(sys.argv[1])); "
        f"os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES={name!r}, "
        "LISTEN_PID=str(os.getpid())); "
        "os.execv(sys.executable, [sys.executable, '-m', 'txsocketserver', *sys.argv[2:]])"
    )
    return [sys.executable, "-c", wrapper, str(fd)]
