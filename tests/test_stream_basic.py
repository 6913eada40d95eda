"""Stream servers doing their job: echo, the serving loops, and overridden hooks."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time

import pytest

from support import (
    ANY_PORT,
    WAIT,
    connect,
    connect_to,
    ipv6_loopback_available,
    recv_all,
    request_reply,
    run_in_thread,
    serve_in_thread,
    wait_until,
)


def echo_handler(ss, seen=None):
    """A StreamRequestHandler echoing lines until EOF, recording client addresses."""

    class Echo(ss.StreamRequestHandler):
        def handle(self):
            if seen is not None:
                seen.append(self.client_address)
            for line in self.rfile:
                self.wfile.write(line)

    return Echo


@contextlib.contextmanager
def stream_server(ss, kind, threading_, handler, unix_path):
    if kind == "tcp":
        cls = ss.ThreadingTCPServer if threading_ else ss.TCPServer
        address = ANY_PORT
    else:
        cls = ss.ThreadingUnixStreamServer if threading_ else ss.UnixStreamServer
        address = unix_path
    with cls(address, handler) as server:
        yield server


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_echo(ss, kind, threading_, unix_path):
    seen = []
    with stream_server(ss, kind, threading_, echo_handler(ss, seen), unix_path) as server:
        with serve_in_thread(server):
            for n in range(3):
                payload = b"".join(b"line %d-%d\n" % (n, i) for i in range(50))
                assert request_reply(server, payload) == payload
            with connect_to(server) as sock:
                client = sock.getsockname()
                sock.sendall(b"hello\n")
                assert sock.recv(100) == b"hello\n"
    if kind == "tcp":
        assert seen[-1] == client
        assert all(addr[0] == "127.0.0.1" for addr in seen)
    else:
        # An unbound Unix client has an empty address, as accept() reports it.
        assert seen == ["", "", "", ""]


@pytest.mark.parametrize("threading_", [False, True], ids=["sync", "threading"])
def test_concurrent_clients_queue_on_sync_server(ss, threading_):
    """Sync: one request at a time (others wait); threading: concurrent."""
    clients = 4
    active = []
    peak = []
    lock = threading.Lock()
    connected = []

    class Slow(ss.StreamRequestHandler):
        def handle(self):
            with lock:
                first = not peak
                active.append(1)
                peak.append(len(active))
            if first:
                # Hold the first request until every client waits for the
                # server; then a threading server starts another one at once,
                # while a sync server must start none for as long as we hold.
                assert wait_until(lambda: len(connected) == clients)
                wait_until(lambda: len(peak) > 1, timeout=WAIT if threading_ else 0.2)
            self.wfile.write(self.rfile.readline())
            with lock:
                active.pop()

    def client(payload):
        with connect_to(server) as sock:
            connected.append(sock)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return recv_all(sock)

    cls = ss.ThreadingTCPServer if threading_ else ss.TCPServer
    with cls(ANY_PORT, Slow) as server, serve_in_thread(server):
        runs = [run_in_thread(client, b"x%d\n" % i) for i in range(clients)]
        for run in runs:
            assert run.join().error is None
        replies = [run.value for run in runs]
    assert replies == [b"x%d\n" % i for i in range(4)]
    if threading_:
        assert max(peak) > 1
    else:
        assert max(peak) == 1


def test_handle_request_without_timeout(ss):
    timeouts = []

    class Server(ss.TCPServer):
        def handle_timeout(self):
            timeouts.append(1)

    with Server(ANY_PORT, echo_handler(ss)) as server:
        handling = run_in_thread(server.handle_request)
        # With no client, handle_request() keeps waiting; it serves the late one.
        assert not handling.done.wait(0.2)
        assert request_reply(server, b"one\n") == b"one\n"
        assert handling.join().error is None
        assert handling.value is None
        # A connection already waiting is served at once.
        with connect_to(server) as sock:
            sock.sendall(b"two\n")
            sock.shutdown(socket.SHUT_WR)
            server.handle_request()
            assert recv_all(sock) == b"two\n"
    assert timeouts == []


def test_handle_request_timeout_calls_handle_timeout(ss):
    calls = []

    class Server(ss.TCPServer):
        timeout = 0.2

        def handle_timeout(self):
            calls.append("handle_timeout")

    with Server(ANY_PORT, echo_handler(ss)) as server:
        started = time.monotonic()
        assert server.handle_request() is None
        elapsed = time.monotonic() - started
        assert calls == ["handle_timeout"]
        assert 0.15 <= elapsed < 2.0
        # The server still works after a timeout.  The client connects first,
        # so that a slow client thread cannot make handle_request() time out.
        with connect_to(server) as sock:
            sock.sendall(b"late\n")
            sock.shutdown(socket.SHUT_WR)
            server.handle_request()
            assert recv_all(sock) == b"late\n"
    assert calls == ["handle_timeout"]


def test_instance_timeout_used_by_handle_request(ss):
    calls = []

    class Server(ss.TCPServer):
        def handle_timeout(self):
            calls.append(time.monotonic())

    with Server(ANY_PORT, echo_handler(ss)) as server:
        server.timeout = 0.1
        started = time.monotonic()
        server.handle_request()
        server.handle_request()
    assert len(calls) == 2
    assert calls[-1] - started >= 0.18


def test_serve_forever_and_shutdown_from_other_thread(ss):
    with ss.TCPServer(ANY_PORT, echo_handler(ss)) as server:
        serving = run_in_thread(server.serve_forever, 0.05)
        assert request_reply(server, b"a\n") == b"a\n"
        assert not serving.done.is_set()
        run_in_thread(server.shutdown).join()
        serving.join()
        assert serving.error is None and serving.value is None
        # Serving again after a shutdown works.
        with serve_in_thread(server):
            assert request_reply(server, b"b\n") == b"b\n"


def test_service_actions_called_by_serve_forever(ss):
    calls = []

    class Server(ss.TCPServer):
        def service_actions(self):
            calls.append(threading.get_ident())

    with Server(ANY_PORT, echo_handler(ss)) as server:
        with serve_in_thread(server, poll_interval=0.05) as serving:
            assert wait_until(lambda: len(calls) >= 3)
            assert request_reply(server, b"x\n") == b"x\n"
        # Called on the thread running serve_forever, like every other hook.
        assert set(calls) == {serving.thread.ident}


def test_bind_and_activate_false(ss):
    with ss.TCPServer(ANY_PORT, echo_handler(ss), bind_and_activate=False) as server:
        assert server.server_address == ANY_PORT
        server.allow_reuse_address = True
        server.server_bind()
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        host, port = server.server_address
        assert host == "127.0.0.1" and port > 0
        server.server_activate()
        with serve_in_thread(server):
            assert request_reply(server, b"manual\n") == b"manual\n"


def test_bind_and_activate_false_unix(ss, unix_path):
    with ss.UnixStreamServer(unix_path, echo_handler(ss), bind_and_activate=False) as server:
        server.server_bind()
        server.server_activate()
        with serve_in_thread(server):
            assert request_reply(server, b"manual\n") == b"manual\n"


def test_server_bind_override_sets_option_before_bind(ss):
    observed = {}

    class Server(ss.TCPServer):
        def server_bind(self):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            observed["unbound"] = self.socket.getsockname()
            super().server_bind()
            observed["bound"] = self.socket.getsockname()

    with Server(ANY_PORT, echo_handler(ss)) as server:
        assert observed["unbound"] == ("0.0.0.0", 0)
        assert observed["bound"] == server.server_address
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        with serve_in_thread(server):
            assert request_reply(server, b"opt\n") == b"opt\n"


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_dual_stack_server_bind_like_http_server(ss):
    """http.server's DualStackServer: clear IPV6_V6ONLY in server_bind."""
    seen = []
    v6only = []

    class DualStackServer(ss.ThreadingTCPServer):
        address_family = socket.AF_INET6

        def server_bind(self):
            with contextlib.suppress(Exception):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            v6only.append(self.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            return super().server_bind()

    with DualStackServer(("::1", 0), echo_handler(ss, seen)) as server:
        # The option stuck before bind (Linux sets it again when binding to ::1).
        assert v6only == [0]
        assert server.server_address[0] == "::1" and len(server.server_address) == 4
        with serve_in_thread(server):
            assert request_reply(server, b"six\n") == b"six\n"
    assert seen[0][0] == "::1" and len(seen[0]) == 4


def test_server_activate_override(ss):
    calls = []

    class Server(ss.TCPServer):
        request_queue_size = 17

        def server_activate(self):
            calls.append(
                ("before", self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            )
            super().server_activate()
            calls.append(
                ("after", self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            )

    with Server(ANY_PORT, echo_handler(ss)) as server:
        assert calls == [("before", 0), ("after", 1)]
        with serve_in_thread(server):
            assert request_reply(server, b"act\n") == b"act\n"


def test_get_request_wraps_in_tls(ss, tls_cert):
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tls_cert.cert_path, tls_cert.key_path)
    seen = []

    class TLSServer(ss.TCPServer):
        def get_request(self):
            sock, address = super().get_request()
            try:
                return server_context.wrap_socket(sock, server_side=True), address
            except BaseException:
                sock.close()
                raise

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            seen.append((type(self.request), self.request.version()))
            for line in self.rfile:
                self.wfile.write(line.upper())

    client_context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with TLSServer(ANY_PORT, Handler) as server, serve_in_thread(server):
        for _ in range(2):
            with connect_to(server) as raw:
                with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                    assert tls.version().startswith("TLS")
                    tls.sendall(b"secret\n")
                    assert tls.recv(100) == b"SECRET\n"
                    tls.sendall(b"more\n")
                    assert tls.recv(100) == b"MORE\n"
    assert len(seen) == 2
    assert all(issubclass(t, ssl.SSLSocket) and v.startswith("TLS") for t, v in seen)


def test_tls_client_with_bad_handshake_does_not_stop_server(ss, tls_cert):
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tls_cert.cert_path, tls_cert.key_path)

    class TLSServer(ss.TCPServer):
        def get_request(self):
            sock, address = super().get_request()
            sock.settimeout(WAIT)
            try:
                return server_context.wrap_socket(sock, server_side=True), address
            except BaseException:
                sock.close()
                raise

    client_context = ssl.create_default_context(cafile=tls_cert.cert_path)
    with TLSServer(ANY_PORT, echo_handler(ss)) as server, serve_in_thread(server):
        with connect_to(server) as raw:
            raw.sendall(b"this is not a TLS client hello\r\n\r\n")
            with contextlib.suppress(OSError):
                recv_all(raw)
        with connect_to(server) as raw:
            with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"ok\n")
                assert tls.recv(100) == b"ok\n"


def test_verify_request_false_closes_connection(ss):
    calls = []
    decisions = [False, True, False]

    class Guarded(ss.TCPServer):
        def verify_request(self, request, client_address):
            calls.append("verify_request")
            return decisions.pop(0)

    class Handler(ss.StreamRequestHandler):
        def handle(self):
            calls.append("handle")
            self.wfile.write(b"welcome\n")

    def attempt():
        with connect_to(server) as sock:
            try:
                return recv_all(sock)
            except ConnectionResetError:
                return b""

    with Guarded(ANY_PORT, Handler) as server, serve_in_thread(server):
        replies = [attempt() for _ in range(3)]
    # A denied client sees the connection closed without any data.
    assert replies == [b"", b"welcome\n", b""]
    assert calls == ["verify_request", "verify_request", "handle", "verify_request"]


def test_connection_to_unix_path(ss, unix_path):
    with ss.UnixStreamServer(unix_path, echo_handler(ss)) as server, serve_in_thread(server):
        with connect(unix_path, socket.AF_UNIX) as sock:
            sock.sendall(b"u\n")
            assert sock.recv(10) == b"u\n"
